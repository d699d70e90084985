"""Driver side of a training run: validate data, build the TorchTrainer, fit, write run.json.

Layout under `storage.uri`:
    runs/<run_name>/checkpoint_e0003_s00000/   Ray Train checkpoints (state.pt, meta.json, ...)
    runs/<run_name>/run.json                   the run record
The run name is `<name>-<hash of config and dataset version>`: rerunning the same command finds the same folder, and
Ray Train resumes from its latest checkpoint.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mlops_ray.cluster.cost import NodeHours
from mlops_ray.cluster.cost import summary_line as cost_line
from mlops_ray.data import Prepared, prepare
from mlops_ray.errors import TrainingFailed
from mlops_ray.evaluation.metrics import binary_metrics
from mlops_ray.runtime import code_version, ensure_ray, library_versions
from mlops_ray.storage import Storage, from_cfg
from mlops_ray.train import checkpoint as ckpt_io
from mlops_ray.train.gate import from_env as gate_from_env
from mlops_ray.train.resume import repair_run_dir
from mlops_ray.utils import stable_hash

# sections that change where or how a run executes, not what it computes
NOT_HASHED = ("storage", "tracking", "ray", "cluster", "cost", "failure", "checkpoint",
              "from_tune")


def config_hash(cfg: dict[str, Any]) -> str:
    return stable_hash({k: v for k, v in cfg.items() if k not in NOT_HASHED})


def run_name_for(cfg: dict[str, Any], data_version: str) -> str:
    """<name>-<hash of config hash and dataset version>: new data never resumes old weights."""
    return f"{cfg['name']}-{stable_hash([config_hash(cfg), data_version])}"


def torch_threads(cfg: dict[str, Any]) -> int:
    if cfg["train"].get("torch_threads"):
        return int(cfg["train"]["torch_threads"])
    cpu = (cfg["scaling"].get("resources_per_worker") or {}).get("CPU", 1)
    return max(1, math.ceil(cpu))


def loop_config(cfg: dict[str, Any], prepared: Prepared | dict[str, Any], data_ref: Any,
                run_name: str) -> dict[str, Any]:
    """The plain dict each worker receives (no DictConfig, no pydantic)."""
    t = cfg["train"]
    return {
        "run_name": run_name, "seed": cfg["seed"], "epochs": t["epochs"],
        "batch_size": t["batch_size"], "precision": t["precision"],
        "lr_schedule": t["lr_schedule"], "early_stopping": t["early_stopping"],
        "fairness_penalty": t["fairness_penalty"],
        "torch_threads": torch_threads(cfg), "use_gpu": cfg["scaling"]["use_gpu"],
        "model": cfg["model"], "optim": {**cfg["optim"], "_partial_": True},
        "every_n_epochs": cfg["checkpoint"]["every_n_epochs"],
        "preemption_check_every_n_steps": cfg["checkpoint"]["preemption_check_every_n_steps"],
        "every_n_steps": cfg["checkpoint"]["every_n_steps"],
        "preemption_grace_s": cfg["failure"]["preemption_grace_s"],
        # a per-step log for bench/preemption.py (a path every node can write: a local cluster)
        "step_log": os.environ.get("MLOPS_RAY_STEP_LOG"),
        "step_gate": gate_from_env(),  # tests: hold the run at a step (train/gate.py)
        "score_attribute": cfg["checkpoint"]["checkpoint_score_attribute"],
        **(data_meta(prepared) if isinstance(prepared, Prepared) else prepared),
        "data_ref": data_ref,
    }


def data_meta(prepared: Prepared) -> dict[str, Any]:
    return {"feature_names": prepared.preprocessor.feature_names,
            "preprocessor": prepared.preprocessor.to_dict()}


def arrays(prepared: Prepared, penalty_attr: str | None = None) -> dict[str, np.ndarray]:
    (xt, yt), (xv, yv) = prepared.xy("train"), prepared.xy("val")
    out = {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv}
    if penalty_attr:  # group codes of the training rows, for the fairness penalty only
        col = prepared.frame.iloc[prepared.splits["train"]][penalty_attr].astype(str)
        out["g_train"] = np.unique(col.to_numpy(), return_inverse=True)[1].astype(np.int64)
    return out


def penalty_attribute(cfg: dict[str, Any]) -> str | None:
    fp = cfg["train"].get("fairness_penalty") or {}
    if fp.get("kind", "none") == "none" or not fp.get("weight"):
        return None
    return fp.get("attribute") or cfg["dataset"]["sensitive"][0]


def checkpoint_uri(storage: Storage, path: str) -> str:
    return f"file://{path}" if storage.is_local else f"s3://{path}"


def _progress_callback() -> Any:
    from ray.train import UserCallback

    class Progress(UserCallback):
        """One line per epoch in the driver's log (runs in the Train controller)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            m = metrics[0]
            if "train/loss" in m:
                print(f"[mlops_ray] epoch {m['epoch']}: train/loss={m['train/loss']:.4f} "
                      f"val/auc={m['val/auc']:.4f} {m['time/samples_per_s']:.0f} samples/s"
                      + (" [checkpoint]" if checkpoint else ""), flush=True)

    return Progress()


def build_trainer(cfg: dict[str, Any], prepared: Prepared, run_name: str, storage: Storage,
                  runs_dir: str = "runs", callbacks: list[Any] | None = None) -> Any:
    import ray
    data_ref = ray.put(arrays(prepared, penalty_attribute(cfg)))
    return trainer_for(cfg, loop_config(cfg, prepared, data_ref, run_name), run_name, storage,
                       runs_dir, [_progress_callback(), *(callbacks or [])])


def trainer_for(cfg: dict[str, Any], loop_cfg: dict[str, Any], run_name: str, storage: Storage,
                runs_dir: str, callbacks: list[Any],
                loop_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Any:
    """A TorchTrainer whose every section comes from the config (Ray's own argument names);
    `loop_fn` is the per-worker loop (default: the tabular loop.train_loop_per_worker)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mlops_ray.train.loop import train_loop_per_worker
    scaling = {k: v for k, v in cfg["scaling"].items() if v is not None}
    if isinstance(scaling["num_workers"], (list, tuple)):
        scaling["num_workers"] = tuple(scaling["num_workers"])
    else:  # only elastic runs take the monitor interval
        scaling.pop("elastic_resize_monitor_interval_s", None)
    ck = cfg["checkpoint"]
    # the ignores: mypy sees ray.train's Train v1 classes; Ray 2.60 runs Train v2, whose
    # TorchTrainer takes a loop returning a value and whose RunConfig has logging_config.
    return TorchTrainer(
        loop_fn or train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(  # type: ignore[call-arg]
            name=run_name, **storage.ray_args(runs_dir),
            failure_config=FailureConfig(**cfg["failure"]),
            checkpoint_config=CheckpointConfig(
                num_to_keep=ck["num_to_keep"],
                checkpoint_score_attribute=ck["checkpoint_score_attribute"],
                checkpoint_score_order=ck["checkpoint_score_order"]),
            logging_config=LoggingConfig(log_level=cfg["ray"]["train_log_level"]),
            callbacks=callbacks))


def _best_checkpoint(result: Any, cfg: dict[str, Any]) -> Any:
    attr, order = cfg["checkpoint"]["checkpoint_score_attribute"], \
        cfg["checkpoint"]["checkpoint_score_order"]
    scored = [(c, m) for c, m in (result.best_checkpoints or [])
              if attr and attr in m and m[attr] == m[attr]]  # NaN: a mid-epoch checkpoint
    if not scored:
        return result.checkpoint
    return (max if order == "max" else min)(scored, key=lambda cm: cm[1][attr])[0]


def test_metrics(checkpoint: Any, prepared: Prepared) -> dict[str, float]:
    """Held-out test metrics of a checkpoint (threshold 0.5; evaluation picks it on val)."""
    with checkpoint.as_directory() as d:
        model, pre, _ = ckpt_io.load_model(d)
    rows = prepared.frame.iloc[prepared.splits["test"]]
    return binary_metrics(prepared.labels(rows), ckpt_io.predict_proba(model, pre.transform(rows)), prefix="test/")


def base_record(cfg: dict[str, Any], prepared: Prepared, run_name: str, storage: Storage,
                runs_dir: str = "runs") -> dict[str, Any]:
    return {
        "run_name": run_name, "name": cfg["name"], "status": "running", "seed": cfg["seed"],
        "config": cfg, "config_hash": config_hash(cfg),
        "dataset": {"name": cfg["dataset"]["name"], "uri": cfg["dataset"]["uri"],
                    **prepared.summary()},
        "code_version": code_version(), "versions": library_versions(),
        "run_uri": storage.uri_of(runs_dir, run_name),
    }


def run_training(cfg: dict[str, Any], *, prepared: Prepared | None = None,
                 log: Any = print) -> dict[str, Any]:
    """Train one model from a validated config (plain dict). Returns the run record.

    Validation of the data happens before Ray starts or anything is written to storage.
    """
    if cfg.get("task") == "lm":  # a language model on synthetic tokens: lm_trainer.py
        from mlops_ray.train.lm_trainer import run_lm_training
        return run_lm_training(cfg, log=log)
    t_start = time.perf_counter()
    storage = from_cfg(cfg["storage"])
    prepared = prepared or prepare(cfg["dataset"], cfg["seed"], storage=cfg["storage"])
    run_name = run_name_for(cfg, prepared.version)
    cluster = ensure_ray(cfg["ray"])
    record = base_record(cfg, prepared, run_name, storage)
    start_record(record, storage, run_name, cluster, log)
    trainer = build_trainer(cfg, prepared, run_name, storage)
    result, node_hours = fit(trainer, cfg, record, storage, run_name)
    ret = result.return_value or {}
    history = ret.get("history", [])
    best_ckpt = _best_checkpoint(result, cfg)
    record.update(
        status="finished", history=history, restored_from=ret.get("restored_from"),
        stopped_early=ret.get("stopped_early"), world_size=ret.get("world_size"),
        preemptions_survived=ret.get("preemptions_survived", 0), restarts=ret.get("restarts", 0),
        cost=node_hours.report(cfg["cost"]),
        final={k: v for k, v in (history[-1] if history else {}).items()},
        checkpoints={"latest": checkpoint_uri(storage, result.checkpoint.path),
                     "best": checkpoint_uri(storage, best_ckpt.path)},
    )
    # the metrics reported with the checkpoint that `checkpoints.best` points at
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best_ckpt.path),
                        history[-1] if history else {})
    record["best"] = {k: v for k, v in best_metrics.items() if k != "checkpoint_dir_name"}
    record["test"] = test_metrics(best_ckpt, prepared)
    record["wall_s"] = round(time.perf_counter() - t_start, 2)
    local_out = storage.path() if storage.is_local else os.path.abspath("outputs")
    try:
        record["tracking_dir"] = _log_tracking(record, cfg, os.path.join(local_out, "wandb"))
    except Exception as e:  # noqa: BLE001 - tracking must never lose a finished run
        record["tracking_error"] = f"{type(e).__name__}: {e}"
        print(f"warning: tracking failed ({record['tracking_error']})", file=sys.stderr)
    storage.write_json(record, "runs", run_name, "run.json")
    return record


def start_record(record: dict[str, Any], storage: Storage, run_name: str,
                 cluster: dict[str, Any], log: Any) -> None:
    """Write the run's record as `running` (a finished record stays put), say where the run
    goes, and on a rerun repair what a killed driver left (resume.py)."""
    had_run = storage.exists("runs", run_name, "run.json")
    record["resumed"] = had_run
    if not had_run or storage.read_json("runs", run_name, "run.json").get("status") != "finished":
        storage.write_json(record, "runs", run_name, "run.json")  # a finished record stays put
    log(f"run {run_name}: {'resuming' if had_run else 'starting'} in {record['run_uri']}"
        + (f" (dashboard {cluster['dashboard_url']})" if cluster["dashboard_url"] else ""))
    if had_run:
        repair_run_dir(storage, "runs", run_name, log=log)


def fit(trainer: Any, cfg: dict[str, Any], record: dict[str, Any], storage: Storage,
        run_name: str) -> tuple[Any, NodeHours]:
    """trainer.fit() with node-hours counted; out of retries -> a `failed` run record and
    TrainingFailed naming the last error (checkpoints stay for a rerun to resume)."""
    from ray.train.v2.api.exceptions import TrainingFailedError
    try:
        with NodeHours(cfg["cost"]["sample_s"]) as node_hours:
            result = trainer.fit()
    except TrainingFailedError as e:
        record.update(status="failed", error=str(e).splitlines()[0][:2000],
                      cost=node_hours.report(cfg["cost"]))
        storage.write_json(record, "runs", run_name, "run.json")
        raise TrainingFailed(f"run {run_name} failed after its retries: {record['error']} "
                             f"(checkpoints kept in {record['run_uri']}; rerun to resume)") from None
    return result, node_hours


def _log_tracking(record: dict[str, Any], cfg: dict[str, Any], local_dir: str) -> str | None:
    from mlops_ray.tracking import log_run
    return log_run(record, cfg["tracking"], local_dir)


def summary_lines(record: dict[str, Any]) -> list[str]:
    if record.get("task") == "lm":
        from mlops_ray.train.lm_trainer import summary_lines as lm_lines
        return lm_lines(record)
    best, test = record.get("best", {}), record.get("test", {})
    lines = [
        f"run        {record['run_name']} ({record['status']}"
        + (f", resumed from epoch {record['restored_from']['epoch']}"
           if record.get("restored_from") else "") + ")",
        f"data       {record['dataset']['name']} version {record['dataset']['version']} "
        f"rows {record['dataset']['splits']}",
        f"best val   auc {best.get('val/auc', float('nan')):.4f} at epoch {best.get('epoch')}",
        f"test       auc {test.get('test/auc', float('nan')):.4f}  accuracy "
        f"{test.get('test/accuracy', float('nan')):.4f}  log_loss "
        f"{test.get('test/log_loss', float('nan')):.4f}",
        f"checkpoint {record.get('checkpoints', {}).get('best')}",
        f"run record {record['run_uri']}/run.json",
    ]
    if record.get("tracking_dir"):
        lines.append(f"W&B        {record['tracking_dir']} (offline: `wandb sync` it to upload)")
    if record.get("restarts"):
        lines.append(f"restarts   {record['restarts']} ({record.get('preemptions_survived', 0)} "
                     "from a preemption checkpoint)")
    if line := cost_line(record.get("cost")):
        lines.append(line)
    lines.append(f"wall time  {record.get('wall_s')} s")
    return lines
