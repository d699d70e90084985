"""Driver side of tuning: Optuna (TPE / random / CMA-ES) inside Ray Tune, ASHA on the reported
epoch, the study in a database, and resume by rerunning the same command.

Layout under `storage.uri`:
    tune/<study>/                 Tune's experiment folder (state, one folder per trial)
    tune/<study>/trials/          Train runs of multi-worker trials (trial_backend=train)
    tune/<study>/tune.json        the summary; tune/<study>/tune_curve.png the best-so-far curve
    runs/<study>-best/run.json    the best trial as a run record, like jobs.train writes
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

from mlops_ray.cluster.cost import NodeHours
from mlops_ray.config.train import NOT_HASHED, TrainJob, hashed_dataset
from mlops_ray.config.tune import TuneJob
from mlops_ray.data import Prepared, prepare
from mlops_ray.db import db_url
from mlops_ray.runtime import ensure_ray
from mlops_ray.storage import Storage, from_cfg
from mlops_ray.train.driver import base_record, checkpoint_digest, checkpoint_uri, trainer_for
from mlops_ray.train.tasks.tabular import arrays, loop_config, test_metrics
from mlops_ray.tune.space import apply, decode, default_point, define_by_run
from mlops_ray.utils import stable_hash


def study_name(job: TuneJob, data_version: str) -> str:
    """<name>-tune-<hash of everything that shapes the study, and the dataset version>."""
    base = job.train_job().plain()
    base["dataset"] = hashed_dataset(base["dataset"])  # as config_hash: names kept
    t = job.tune
    what = {**{k: v for k, v in base.items() if k not in NOT_HASHED},
            "space": {k: v.plain() for k, v in job.space.items()},
            "search": job.search.plain(), "scheduler": job.scheduler.plain(),
            "tune": {k: getattr(t, k) for k in ("num_samples", "metric", "mode", "trial_backend")},
            # the constraints steer the sampler: other gates make another study
            **({"gates": [job.gates.plain(), job.threshold.plain(), job.fairness.plain()]}
               if t.gate_aware and job.gates else {}),
            **({} if t.include_defaults else {"no_defaults": True}),
            "data_version": data_version}
    return f"{job.name}-tune-{stable_hash(what)}"


def trial_dirname(trial: Any) -> str:
    """Deterministic trial folders (Tune's default name carries a timestamp)."""
    return f"trial_{trial.trial_id}"


def _sampler(job: TuneJob) -> Any:
    import optuna
    search = job.search
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    if search.algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=search.seed,
                                            n_startup_trials=search.n_startup_trials,
                                            warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.n_startup_trials)


def _scheduler(job: TuneJob) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    s = job.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    # the reported epoch count is the time axis: a restored trial keeps its rung (Tune's own
    # training_iteration restarts at 1 after a restore)
    return ASHAScheduler(time_attr="epochs_done", max_t=job.max_t(),
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _trainable(job: TuneJob, prepared: Prepared, data_ref: Any, backend: str,
               storage: Storage, study: str) -> Any:
    """The Tune trainable: each trial's train job is the base job with the sampled values."""
    from ray import tune

    from mlops_ray.train.gate import from_env
    from mlops_ray.tune.gating import gate_spec, milestones
    gate = from_env()  # read here, on the driver: trials run in other processes
    judge = {"gate": gate_spec(job, prepared), "gate_at": milestones(job)}
    base = job.train_job().plain()
    pre = prepared.preprocessor
    names, pre_dict = pre.feature_names, pre.to_dict()

    # trials log no W&B themselves (an ASHA-stopped trial's thread never returns to finish its
    # run): the driver's wandb_callback logs each trial's reports as they arrive
    def trial_job(config: dict[str, Any]) -> TrainJob:
        return TrainJob.stored(apply(base, config))  # the space's values are within its bounds

    def function_trial(config: dict[str, Any]) -> None:
        from mlops_ray.train.session import TuneSession
        from mlops_ray.train.tasks import tabular_loop
        name = f"trial-{tune.get_context().get_trial_id()}"
        lc = loop_config(trial_job(config), names, pre_dict, name, data_ref)
        tabular_loop(lc.model_copy(update={"step_gate": gate, "tracking": None, **judge})
                     .plain(), TuneSession())

    def train_trial(config: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from mlops_ray.train.tasks import tabular_loop
        tj = trial_job(config)
        # a stable name: a retried or restored trial resumes its own Train checkpoints
        name = f"trial-{tune.get_context().get_trial_id()}"
        lc = loop_config(tj, names, pre_dict, name, data_ref)
        lc = lc.model_copy(update={"step_gate": gate, "tracking": None, **judge})
        trainer_for(tj, tabular_loop, lc.plain(), name, storage, f"tune/{study}/trials",
                    [TuneReportCallback()], tj.model.spec().get("library", "torch")).fit()

    if backend == "function":
        res = job.scaling.resources_per_worker or {"CPU": 1}
        req = {k.lower() if k in ("CPU", "GPU") else k: v for k, v in res.items()}
        if job.scaling.use_gpu:
            req.setdefault("gpu", 1)
        return tune.with_resources(function_trial, req)
    drv = {k.lower() if k in ("CPU", "GPU") else k: v
           for k, v in job.tune.driver_resources.items()}
    return tune.with_resources(train_trial, drv)


def _tuner(job: TuneJob, trainable: Any, storage: Storage, study: str, url: str
           ) -> tuple[Any, bool]:
    from optuna.storages import RDBStorage
    from ray import tune

    from mlops_ray.tune.callbacks import metrics_callback, wandb_callback
    from mlops_ray.tune.gating import GateAwareOptunaSearch
    t = job.tune
    path = storage.path("tune", study)
    fs = None if storage.is_local else storage.fs
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        # finished trials are kept; running/pending ones resume from their checkpoints
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=fs), True
    space = {k: v.plain() for k, v in job.space.items()}
    first = default_point(job.train_job().plain(), space) if t.include_defaults else None
    search = GateAwareOptunaSearch(space=define_by_run(space), metric=t.metric, mode=t.mode,
                                   points_to_evaluate=[first] if first else None,
                                   sampler=_sampler(job), study_name=study,
                                   storage=RDBStorage(pickle_safe_url(url),
                                                      heartbeat_interval=None))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent_trials,
                                    search_alg=search, scheduler=_scheduler(job),
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=study, **storage.ray_args("tune"),
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=0,
            callbacks=[metrics_callback(study, t.metric, t.mode),
                       *wandb_callback(job, storage, study)]),
    ), False


def _trial_rows(result: Any) -> list[dict[str, Any]]:
    df = result.metrics_dataframe
    if df is None or df.empty:
        return []
    keep = [c for c in df.columns if "/" in c or c in (
        "epoch", "epochs_done", "timestamp", "trial_id", "checkpoint_path", "restored_from_epoch",
        "early_stopped", "feasible", "round", "best_round")]
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df[keep].to_dict("records")]


def _summarise(results: Any, job: TuneJob, storage: Storage) -> dict[str, Any]:
    t, max_t = job.tune, job.max_t()
    sign = 1 if t.mode == "max" else -1
    trials = []
    for r in results:
        rows = _trial_rows(r)
        last = rows[-1] if rows else {}
        scores = [row[t.metric] for row in rows if row.get(t.metric) is not None]
        ckpts = [row["checkpoint_path"] for row in rows if row.get("checkpoint_path")]
        ckpt = (checkpoint_uri(storage, ckpts[-1]) if ckpts else
                (checkpoint_uri(storage, r.checkpoint.path) if r.checkpoint else None))
        epochs = int(last.get("epochs_done") or 0)
        trials.append({
            "trial_id": last.get("trial_id") or r.path.rsplit("/", 1)[-1],
            "params": {k: decode(v) for k, v in r.config.items()},
            "status": "ERROR" if r.error else ("EARLY_STOPPED" if epochs < max_t and not
                                               last.get("early_stopped") else "TERMINATED"),
            "epochs": epochs, "reported_epochs": len(rows),
            "restored_from_epoch": max((-1 if row.get("restored_from_epoch") is None
                                        else row["restored_from_epoch"]) for row in rows)
            if rows else -1,
            "last": {k: v for k, v in last.items() if "/" in k},
            "best_value": (max if sign > 0 else min)(scores) if scores else None,
            "final_value": scores[-1] if scores else None,
            "checkpoint": ckpt, "error": str(r.error)[:500] if r.error else None, "_rows": rows,
        })
    from mlops_ray.tune.gating import feasibility
    gates = feasibility(trials)
    ok = [x for x in trials if x["final_value"] is not None and x["status"] != "ERROR"
          and x["checkpoint"]]
    # gate-aware: the best feasible trial; with none feasible, the best one (the evaluation
    # will then fail it, saying why) and the summary names the rule that bound
    pool = [x for x in ok if x["feasible"]] if gates["estimated"] else ok
    best = max(pool or ok, key=lambda x: sign * x["final_value"]) if ok else None
    gates["best_is_feasible"] = bool(best and best["feasible"]) if gates["estimated"] else None
    return {"trials": trials, "best": best, "gates": gates}


def _curve(trials: list[dict[str, Any]], metric: str, mode: str) -> list[tuple[int, float]]:
    """Best-so-far metric against epochs consumed, in the order results arrived."""
    rows = sorted((r.get("timestamp") or 0, i, r.get("epochs_done") or 0, r.get(metric))
                  for i, tr in enumerate(trials) for r in tr["_rows"])
    out, best, used = [], None, 0
    for _, _, _, v in rows:
        used += 1
        if v is not None and (best is None or (v > best if mode == "max" else v < best)):
            best = v
        if best is not None:
            out.append((used, best))
    return out


def plot_curves(curves: dict[str, list[tuple[int, float]]], metric: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        if pts:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=label)
    ax.set_xlabel("epochs consumed")
    ax.set_ylabel(f"best {metric} so far")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_tuning(job: TuneJob, *, prepared: Prepared | None = None,
               log: Any = print) -> dict[str, Any]:
    """Tune from a validated TuneJob; returns the tune.json summary."""
    import ray
    t0 = time.perf_counter()
    storage = from_cfg(job.storage.plain())
    prepared = prepared or prepare(job.dataset, job.seed, storage=job.storage)
    study = study_name(job, prepared.version)
    url = db_url(job.db.plain(), storage)
    cluster = ensure_ray(job.ray.plain())
    backend = job.tune.backend(job.scaling.bounds()[1])
    from mlops_ray.tune.gating import sensitive_val
    data = arrays(prepared, job.penalty_attribute())
    if job.tune.gate_aware and job.gates is not None:
        data["s_val"] = sensitive_val(job, prepared)
    data_ref = ray.put(data)
    trainable = _trainable(job, prepared, data_ref, backend, storage, study)
    tuner, restored = _tuner(job, trainable, storage, study, url)
    log(f"study {study}: {'resuming' if restored else 'starting'} "
        f"({job.search.algorithm} + {job.scheduler.name}, "
        f"{job.tune.num_samples} trials, {backend} trials) in {storage.uri_of('tune', study)}"
        + (f"; dashboard {cluster['dashboard_url']}" if cluster["dashboard_url"] else ""))
    with NodeHours(job.cost.sample_s) as node_hours:
        results = tuner.fit()
    s = _summarise(results, job, storage)
    t, best = job.tune, s["best"]
    summary: dict[str, Any] = {
        "study": study, "db_url": url.split("@")[-1] if "@" in url else url,
        "algorithm": job.search.algorithm, "scheduler": job.scheduler.name,
        "metric": t.metric, "mode": t.mode, "num_samples": t.num_samples,
        "trial_backend": backend, "resumed": restored, "n_trials": len(s["trials"]),
        "total_epochs": sum(x["reported_epochs"] for x in s["trials"]),
        "wall_s": round(time.perf_counter() - t0, 1),
        "trials": [{k: v for k, v in x.items() if k != "_rows"} for x in s["trials"]],
        "curve": _curve(s["trials"], t.metric, t.mode),
        "tune_uri": storage.uri_of("tune", study),
        # trials that restarted from their own checkpoint (a lost node, a killed driver)
        "resumed_trials": sum(x["restored_from_epoch"] >= 0 for x in s["trials"]),
        "gates": {"aware": bool(job.tune.gate_aware and job.gates), **s["gates"]},
        "cost": node_hours.report(job.cost.plain()),
    }
    if best:
        best_job = TrainJob.stored(apply(job.train_job().plain(), best["params"]))
        rec = base_record(best_job, f"{study}-best", {"name": job.dataset.name,
                                                      "uri": job.dataset.uri,
                                                      **prepared.summary()}, storage)
        ckpt = _checkpoint(best["checkpoint"], storage)
        rec.update(status="finished", history=[r for r in best["_rows"]],
                   checkpoints={"latest": best["checkpoint"], "best": best["checkpoint"],
                                "digest": dict.fromkeys(("latest", "best"),
                                                        checkpoint_digest(ckpt))},
                   best={t.metric: best["final_value"]}, test=test_metrics(ckpt, prepared),
                   tune={"study": study, "trial_id": best["trial_id"],
                         "params": best["params"]})
        storage.write_json(rec, "runs", f"{study}-best", "run.json")
        summary["best"] = {"trial_id": best["trial_id"], "params": best["params"],
                           "value": best["final_value"], "epochs": best["epochs"],
                           "feasible": best["feasible"], "constraints": best["constraints"],
                           "checkpoint": best["checkpoint"], "run_uri": rec["run_uri"],
                           "test": rec["test"]}
    storage.write_json(summary, "tune", study, "tune.json")
    if storage.is_local:
        from mlops_ray.tune.gating import gate_spec, plot_pareto
        plot_curves({f"{summary['algorithm']}+{summary['scheduler']}": summary["curve"]},
                    t.metric, storage.path("tune", study, "tune_curve.png"))
        spec = gate_spec(job, prepared)
        if spec and plot_pareto(summary["trials"], spec["rules"], t.metric,
                                storage.path("tune", study, "tune_pareto.png")):
            summary["gates"]["plot"] = storage.uri_of("tune", study, "tune_pareto.png")
            storage.write_json(summary, "tune", study, "tune.json")
    return summary


def pickle_safe_url(url: str) -> str:
    """The study database's URL without its password: Tune pickles the searcher, and with it
    Optuna's storage and its URL, into the study's folder. A PostgreSQL password moves to
    PGPASSWORD (libpq's own variable) for this process; elsewhere use ~/.pgpass."""
    import re
    m = re.match(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]+):(?P<pw>[^@/\s]+)@", url)
    if not m:
        return url
    if not url.startswith("postgresql"):
        from mlops_ray.errors import ConfigError
        raise ConfigError(f"db.url: a password in the URL would be pickled with the tuning "
                          f"state; for {url.split(':')[0]} give it through the driver's own "
                          "credential file instead")
    from urllib.parse import unquote
    os.environ.setdefault("PGPASSWORD", unquote(m["pw"]))
    return m["head"] + "@" + url[m.end():]


def _checkpoint(uri: str, storage: Storage) -> Any:
    from ray.train import Checkpoint
    path = uri.removeprefix("file://").removeprefix("s3://")
    return Checkpoint(path) if storage.is_local else Checkpoint(path, filesystem=storage.fs)


def load_summary(uri: str, storage_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """tune.json from a tuning folder URI or the file's URI."""
    from mlops_ray.errors import RunNotFound
    uri = uri.removesuffix("/tune.json").rstrip("/")
    st = from_cfg({**(storage_cfg or {}), "uri": uri})
    if not st.exists("tune.json"):
        raise RunNotFound(f"no tuning summary at {uri}/tune.json")
    return st.read_json("tune.json")


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"study      {s['study']} ({s['algorithm']} + {s['scheduler']}, {s['n_trials']} "
             f"trials, {s['total_epochs']} epochs, {s['wall_s']} s"
             + (", resumed" if s["resumed"] else "") + ")"]
    for x in sorted(s["trials"], key=lambda x: -(x["final_value"] or -1e9)
                    if s["mode"] == "max" else (x["final_value"] or 1e9)):
        v, f = x["final_value"], x.get("feasible")
        lines.append(f"  {x['trial_id']:<14} {x['status']:<13} epochs {x['epochs']:>3}  "
                     f"{s['metric']} {v if v is None else round(v, 4)}"
                     + ("" if f is None else "  feasible" if f else
                        f"  infeasible ({x['binding']})"))
    g = s.get("gates") or {}
    if g.get("aware"):
        lines.append(f"gates      {g['feasible']} of {g['estimated']} trials estimated feasible "
                     "on their validation rows"
                     + (f"; none was: '{g['binding']}' bound most often "
                        f"({g['binding_counts']}): the best trial will not pass it"
                        if g["estimated"] and not g["feasible"] else "")
                     + (f"; plot {g['plot']}" if g.get("plot") else ""))
    if s.get("best"):
        b = s["best"]
        lines += [f"best       {b['trial_id']} {s['metric']}={b['value']:.4f} "
                  f"test/auc={b['test']['test/auc']:.4f} params {b['params']}"
                  + (" (feasible)" if b.get("feasible") else ""),
                  f"best run   {b['run_uri']}/run.json (use: from_tune={s['tune_uri']})"]
    from mlops_ray.cluster.cost import summary_line
    if line := summary_line(s.get("cost")):
        lines.append(line)
    lines.append(f"summary    {s['tune_uri']}/tune.json")
    return lines


def with_tuned_params(job: TrainJob) -> TrainJob:
    """`from_tune=<tuning folder or tune.json URI>`: the train job with the best params."""
    from mlops_ray.config import validate
    assert job.from_tune is not None
    summary = load_summary(job.from_tune, job.storage.plain())
    if not summary.get("best"):
        from mlops_ray.errors import RunNotFound
        raise RunNotFound(f"from_tune={job.from_tune}: the study has no finished trial")
    return validate(apply(job.plain(), summary["best"]["params"]), TrainJob)
