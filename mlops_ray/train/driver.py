"""The training driver: one run of any task (train/tasks/) on Ray Train.

It owns the run record, builds the TorchTrainer from the job's typed sections (Ray's own
argument names: `ScalingConfig(**scaling.ray_kwargs())`, ...), runs fit with node-hours
counted, and prints the summary. Layout under `storage.uri`:

    runs/<run_name>/checkpoint_e0003_s00000/   Ray Train checkpoints (state.pt, meta.json, ...)
    runs/<run_name>/run.json                   the run record

The run name is `<name>-<hash of config and dataset version>`: rerunning the same command finds
the same folder, and Ray Train resumes from its latest checkpoint.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

from mlops_ray.cluster.cost import NodeHours
from mlops_ray.cluster.cost import summary_line as cost_line
from mlops_ray.config.base import redact
from mlops_ray.config.train import RunSections
from mlops_ray.errors import TrainingFailed
from mlops_ray.runtime import code_version, ensure_ray, library_versions
from mlops_ray.storage import Storage, from_cfg
from mlops_ray.train.resume import repair_run_dir
from mlops_ray.train.tasks import task_for


def checkpoint_uri(storage: Storage, path: str) -> str:
    return f"file://{path}" if storage.is_local else f"s3://{path}"


def _progress_callback(progress: Callable[[dict[str, Any], bool], str | None]) -> Any:
    """Only the line function goes into the callback (pickled to the controller): not the
    task, whose closures hold the prepared data, nor a module that imports torch."""
    from ray.train import UserCallback

    class Progress(UserCallback):
        """One line per report in the driver's log (runs in the Train controller)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            if line := progress(metrics[0], checkpoint is not None):
                print(line, flush=True)

    return Progress()


def trainer_class(kind: str) -> Any:
    """Ray Train's data-parallel trainer for a task: its backend joins the workers (torch
    process group, XGBoost's collective, LightGBM's network)."""
    if kind == "xgboost":
        from ray.train.xgboost import XGBoostTrainer
        return XGBoostTrainer
    if kind == "lightgbm":
        from ray.train.lightgbm import LightGBMTrainer
        return LightGBMTrainer
    from ray.train.torch import TorchTrainer
    return TorchTrainer


def trainer_for(job: RunSections, loop: Callable[[dict[str, Any]], dict[str, Any]],
                loop_cfg: dict[str, Any], run_name: str, storage: Storage, runs_dir: str,
                callbacks: list[Any], kind: str = "torch") -> Any:
    """A Ray Train trainer (`kind`: trainer_class) whose every section comes from the job
    (Ray's own argument names)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    # the ignore: mypy sees ray.train's Train v1 RunConfig; Ray 2.60 runs Train v2, whose
    # RunConfig has logging_config.
    return trainer_class(kind)(
        loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(**job.scaling.ray_kwargs()),
        run_config=RunConfig(  # type: ignore[call-arg]
            name=run_name, **storage.ray_args(runs_dir),
            failure_config=FailureConfig(**job.failure.ray_kwargs()),
            checkpoint_config=CheckpointConfig(**job.checkpoint.ray_kwargs()),
            logging_config=LoggingConfig(log_level=job.ray.train_log_level),
            callbacks=callbacks))


def best_checkpoint(result: Any, job: RunSections) -> Any:
    """The best retained checkpoint by the score attribute (mid-epoch ones score NaN)."""
    attr, order = job.checkpoint.checkpoint_score_attribute, job.checkpoint.checkpoint_score_order
    scored = [(c, m) for c, m in (result.best_checkpoints or [])
              if attr and attr in m and m[attr] == m[attr]]  # NaN: a mid-epoch checkpoint
    if not scored:
        return result.checkpoint
    return (max if order == "max" else min)(scored, key=lambda cm: cm[1][attr])[0]


def start_record(record: dict[str, Any], storage: Storage, run_name: str,
                 cluster: dict[str, Any], log: Any) -> None:
    """Write the run's record as `running` (a finished record stays put), say where the run
    goes, and on a rerun repair what a killed driver left (resume.py)."""
    had_run = storage.exists("runs", run_name, "run.json")
    record["resumed"] = had_run
    if not had_run or storage.read_json("runs", run_name, "run.json").get("status") != "finished":
        storage.write_json(record, "runs", run_name, "run.json")
    log(f"run {run_name}: {'resuming' if had_run else 'starting'} in {record['run_uri']}"
        + (f" (dashboard {cluster['dashboard_url']})" if cluster["dashboard_url"] else ""))
    if had_run:
        repair_run_dir(storage, "runs", run_name, log=log)


def fit(trainer: Any, job: RunSections, record: dict[str, Any], storage: Storage,
        run_name: str) -> tuple[Any, NodeHours]:
    """trainer.fit() with node-hours counted; out of retries -> a `failed` run record and
    TrainingFailed naming the last error (checkpoints stay for a rerun to resume)."""
    from ray.train.v2.api.exceptions import TrainingFailedError
    cost = job.cost.plain()
    try:
        with NodeHours(job.cost.sample_s) as node_hours:
            result = trainer.fit()
    except TrainingFailedError as e:
        record.update(status="failed", error=str(e).splitlines()[0][:2000],
                      cost=node_hours.report(cost))
        storage.write_json(record, "runs", run_name, "run.json")
        raise TrainingFailed(f"run {run_name} failed after its retries: {record['error']} "
                             f"(checkpoints kept in {record['run_uri']}; rerun to resume)") from None
    return result, node_hours


def import_meanwhile(modules: tuple[str, ...]) -> None:
    """Import on a thread what the driver needs after fit() (e.g. scikit-learn for the test
    metrics, ~1 s): fit() waits on Ray with the GIL released, so this is off the run's path."""
    import importlib
    import threading

    def run() -> None:
        for m in modules:
            with contextlib.suppress(Exception):  # the step that needs it imports it again
                importlib.import_module(m)
    threading.Thread(target=run, name="mlops-import", daemon=True).start()


def startup_phases(data_s: float, ray_s: float, t_fit: float, loop: dict[str, Any]
                   ) -> dict[str, float | None]:
    """Where a run's fixed cost went (seconds): loading and validating the data, starting or
    attaching to Ray, from fit() to the train function running on rank 0 (Train's controller,
    placement group and worker group), and from there to the first optimizer step (data to
    the worker, model, DDP). Of the last attempt when the run restarted."""
    entered, first = loop.get("t_entered"), loop.get("t_first_step")
    return {"data_s": round(data_s, 3), "ray_s": round(ray_s, 3),
            "to_workers_s": round(entered - t_fit, 3) if entered else None,
            "to_first_step_s": round(first - entered, 3) if entered and first else None}


def base_record(job: RunSections, run_name: str, dataset: dict[str, Any], storage: Storage,
                runs_dir: str = "runs") -> dict[str, Any]:
    """What every run record starts with: names, config and its hash, data, code, versions."""
    return {"run_name": run_name, "name": job.name, "status": "running", "seed": job.seed,
            "config": redact(job.plain()), "config_hash": job.config_hash(), "dataset": dataset,
            "code_version": code_version(), "versions": library_versions(),
            "run_uri": storage.uri_of(runs_dir, run_name)}


def checkpoint_digest(checkpoint: Any) -> str:
    """The digest run.json records for a Ray Train checkpoint (downloaded when remote)."""
    from mlops_ray.artifacts import checkpoint as ckpt_io
    with checkpoint.as_directory() as d:
        return ckpt_io.digest(d)


def run_training(job: RunSections, *, prepared: Any = None, log: Any = print) -> dict[str, Any]:
    """Train one model from a validated job (TrainJob, or LmJob for `task: lm`); returns the
    run record. The data is validated before Ray starts or anything is written to storage."""
    t_start = time.perf_counter()
    storage = from_cfg(job.storage.plain())
    task = task_for(job, prepared)
    run_name = job.run_name(task.data_version)
    t_data = time.perf_counter()
    cluster = ensure_ray(job.ray.plain())
    t_ray = time.perf_counter()
    record = {**base_record(job, run_name, task.dataset, storage), **task.record}
    start_record(record, storage, run_name, cluster, log)
    trainer = trainer_for(job, task.loop, task.loop_config(run_name), run_name, storage, "runs",
                          [_progress_callback(task.progress)], task.trainer)
    t_fit = time.time()
    import_meanwhile(task.finish_imports)
    result, node_hours = fit(trainer, job, record, storage, run_name)
    ret = result.return_value or {}
    record["startup"] = startup_phases(t_data - t_start, t_ray - t_data, t_fit,
                                       ret.get("startup") or {})
    history = ret.get("history", [])
    best = result.checkpoint if task.best_is_latest else best_checkpoint(result, job)
    record.update(
        status="finished", history=history, restored_from=ret.get("restored_from"),
        stopped_early=ret.get("stopped_early"), world_size=ret.get("world_size"),
        preemptions_survived=ret.get("preemptions_survived", 0), restarts=ret.get("restarts", 0),
        cost=node_hours.report(job.cost.plain()), final=dict(history[-1]) if history else {},
        checkpoints={"latest": checkpoint_uri(storage, result.checkpoint.path),
                     "best": checkpoint_uri(storage, best.path),
                     # verified by every stage that loads them (artifacts.checkpoint.verify)
                     "digest": {"latest": checkpoint_digest(result.checkpoint),
                                "best": checkpoint_digest(best)}},
        **({"summary": ret["summary"]} if "summary" in ret else {}))
    # the metrics reported with the checkpoint that `checkpoints.best` points at
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path),
                        history[-1] if history else {})
    record["best"] = {k: v for k, v in best_metrics.items() if k != "checkpoint_dir_name"}
    task.finish(record, best)
    record["wall_s"] = round(time.perf_counter() - t_start, 2)
    try:
        from mlops_ray.tracking import local_dir, log_run
        record["tracking_dir"] = log_run(record, job.tracking.plain(),
                                         local_dir(job.storage.plain()), step_key=task.step_key,
                                         history=not task.live_tracking)
    except Exception as e:  # noqa: BLE001 - tracking must never lose a finished run
        record["tracking_error"] = f"{type(e).__name__}: {e}"
        print(f"warning: tracking failed ({record['tracking_error']})", file=sys.stderr)
    storage.write_json(record, "runs", run_name, "run.json")
    return record


def summary_lines(record: dict[str, Any]) -> list[str]:
    """What `jobs.train` prints after a run: the task's own lines between the run's."""
    from mlops_ray.train.tasks import lm, tabular
    task_lines = (lm.summary_lines if record.get("task") == "lm" else tabular.summary_lines)
    restored = record.get("restored_from")
    where = (f", resumed from step {restored['step']}" if record.get("task") == "lm"
             else f", resumed from epoch {restored['epoch']}") if restored else ""
    lines = [f"run        {record['run_name']} ({record['status']}{where})",
             *task_lines(record), f"run record {record['run_uri']}/run.json"]
    if record.get("tracking_dir"):
        lines.append(f"W&B        {record['tracking_dir']} (offline: `wandb sync` it to upload)")
    if record.get("restarts"):
        lines.append(f"restarts   {record['restarts']}" + (
            f" ({record.get('preemptions_survived', 0)} from a preemption checkpoint)"
            if record.get("task") != "lm" else ""))
    if line := cost_line(record.get("cost")):
        lines.append(line)
    if st := record.get("startup"):
        lines.append("startup    " + ", ".join(
            f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in st.items()
            if v is not None))
    lines.append(f"wall time  {record.get('wall_s')} s")
    return lines
