"""`jobs.monitor`: watch the production deployment's drift, live quality and the gates judged on
its labelled traffic (the prediction log); past the configured thresholds, run the pipeline on
the new data (by default assembled from the log), so the retrained model meets the same gates
and canary. The trigger, and what the gates decided, are appended to the registry's audit
chain; the new version's lineage names the log parts it learned from."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mlops_ray.config.pipeline import MonitorJob
from mlops_ray.errors import ConfigError, GateFailed, MlopsError


def check(job: MonitorJob, sj: Any, ref: str, reg: Any = None
          ) -> tuple[list[str], dict[str, Any]]:
    """Reasons to retrain `ref` (empty: none) and the evidence: drift rows, live quality and
    the live gates (with the labelled traffic, under "_traffic")."""
    from mlops_ray.serving import control
    m = job.monitor
    rows = control.drift(sj).get(ref, [])
    fb = control.stats(sj)["feedback"].get(ref, {})
    drifted = [r for r in rows if r.get("alert")]
    reasons = []
    if m.max_drifted_features and len(drifted) >= m.max_drifted_features:
        reasons.append("drift in " + ", ".join(
            f"{r['feature']} ({'PSI' if 'psi' in r else 'JS'} "
            f"{r.get('psi', r.get('js')):.2f}, n={r['n']})" for r in drifted))
    auc, n = fb.get("auc"), fb.get("labelled_rows", 0)
    if m.min_live_auc is not None and auc is not None and n >= m.min_labelled_rows \
            and auc < m.min_live_auc:
        reasons.append(f"live AUC {auc:.3f} < {m.min_live_auc} on {n} labelled rows")
    evidence: dict[str, Any] = {"drift": drifted, "live": fb,
                                "rows_seen": max((r["n"] for r in rows), default=0)}
    if job.serve.prediction_log.enabled and (m.live_gates or m.new_data is None):
        from mlops_ray.pipeline import traffic
        cutoff = traffic.cutoff_of(job)
        labelled, sources = traffic.labelled_traffic(job, job.model_name, cutoff)
        evidence["_traffic"] = (labelled, sources, cutoff)
        version = int(ref.split(":")[-1])
        if m.live_gates and reg is not None:
            thr = float(reg.get(ref).metrics.get("test/threshold", 0.5))
            rep = traffic.live_gates(job, version, labelled, {"threshold": thr})
            evidence["live_gates"] = rep or {
                "rows": int((labelled["version"] == version).sum()),
                "note": f"fewer than monitor.min_labelled_rows={m.min_labelled_rows}"}
            n_live = rep["rows"] if rep else 0
            for g in rep["gates"] if rep else []:
                if not g["passed"]:
                    reasons.append(f"live gate {g['name']} would fail on {n_live} labelled "
                                   f"rows: {g['detail']}")
    return reasons, evidence


def monitor(job: MonitorJob, log: Callable[[str], Any] = print) -> int:
    """Check every monitor.interval_s (once with monitor.once=true). Returns the exit code of
    the last retraining: 0 promoted or nothing to do, 5 refused by the gates, else its error's."""
    from mlops_ray.registry import open_registry
    from mlops_ray.serving import control
    m = job.monitor
    reg = open_registry(job)
    model = job.model_name
    sj = job.serve_job()
    if job.ray.address is None:
        from mlops_ray import warm
        if not warm.running():
            raise ConfigError("monitor: this checkout's warm Ray is not running, so nothing is "
                              "served to watch (make run, or name the cluster with ray.address)")
    control.start(sj)  # joins the cluster that serves the app
    handled: set[tuple[int, str]] = set()  # (production version, data version) already tried
    code = 0
    while True:
        cur = control.current_routing(sj)
        if not cur:
            raise ConfigError(f"monitor: app '{sj.app_name}' is not serving on this cluster "
                              "(ray.address); deploy it with jobs.pipeline or jobs.serve")
        ref = next(a["ref"] for a in cur["arms"] if a["role"] == "stable")
        reasons, evidence = check(job, sj, ref, reg)
        live = evidence.get("live_gates") or {}
        if live.get("gates"):
            log(f"{ref}: live gates on {live['rows']} labelled rows: " + ", ".join(
                f"{g['name']} {'pass' if g['passed'] else 'FAIL'}" for g in live["gates"]))
        failing = [g for g in live.get("gates", []) if not g["passed"]]
        if failing and job.serve.drift.webhook_url:  # the alert, where drift alerts go too
            from mlops_ray.serving.live import _post
            _post(job.serve.drift.webhook_url, {
                "alert": "live_gate", "model": model, "version": ref,
                "rows": live["rows"], "failed": [{k: g[k] for k in ("name", "metric", "value",
                                                                     "threshold", "detail")}
                                                 for g in failing]})
        if not reasons:
            log(f"{ref}: no drift past the thresholds ({evidence['rows_seen']} live rows per "
                "feature in the window) and no live gate failing")
        else:
            prepared, dataset = _new_data(job, evidence)
            version = int(ref.split(":")[-1])
            if (version, prepared.version) in handled:
                log(f"{ref}: still {'; '.join(reasons)}; data {prepared.version} was already "
                    "tried against it")
            else:
                handled.add((version, prepared.version))
                code = retrain(job, reg, model, version, reasons, evidence, prepared, dataset,
                               log)
        if m.once:
            return code
        time.sleep(m.interval_s)


def _new_data(job: MonitorJob, evidence: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The retraining data, validated: monitor.new_data, or assembled from the log."""
    from mlops_ray.data import prepare
    if job.monitor.new_data is not None:
        dataset = {**job.dataset.plain(), "uri": job.monitor.new_data}
    else:
        from mlops_ray.pipeline import traffic
        labelled, sources, cutoff = evidence["_traffic"]
        dataset = traffic.retraining_table(job, labelled, sources, cutoff)
    ds = job.dataset.model_validate(dataset)
    return prepare(ds, job.seed, storage=job.storage), dataset


def retrain(job: MonitorJob, reg: Any, model: str, version: int, reasons: list[str],
            evidence: dict[str, Any], prepared: Any, dataset: dict[str, Any],
            log: Callable[[str], Any]) -> int:
    """The pipeline on the new data (already loaded and validated: `prepared`), audited."""
    from mlops_ray.config.base import view
    from mlops_ray.config.pipeline import PipelineJob
    from mlops_ray.pipeline.run import run_pipeline, stage_table
    m, data_version = job.monitor, prepared.version
    why = "; ".join(reasons)
    sources = dataset.get("sources") or {}
    what = dataset["uri"] if not sources else (
        f"the prediction log ({sources['rows']['traffic']} labelled traffic rows + "
        f"{sources['rows']['original']} original rows, cutoff {sources['cutoff']})")
    log(f"{model}:{version}: {why} -> retraining on {what} (data {data_version})")
    public = {k: v for k, v in evidence.items() if not k.startswith("_")}
    reg.record("retrain_triggered", model, version, need="retrain", reason=why,
               details={"new_data": dataset["uri"], "data_version": data_version,
                        "sources": {k: v for k, v in sources.items()
                                    if k not in ("prediction_parts", "label_parts")},
                        **public})
    serve = job.serve.plain()
    serve["rollout"]["max_prediction_shift"] = m.canary_max_prediction_shift
    pj = view(job, PipelineJob, dataset=dataset, serve=serve, trigger=f"jobs.monitor: {why}")
    verdict, code, details = "promoted", 0, {}
    try:
        out = run_pipeline(pj, log=log, prepared=prepared)
        details = {"run": out["run"], "version": out.get("version"),
                   "stages": {e["stage"]: e["status"] for e in out["stages"]}}
        log(stage_table(out["stages"]))
        if reg.aliases(model).get("production") == version:
            verdict = "not promoted"  # e.g. approval is manual
    except GateFailed as e:
        verdict, code, details = "refused", e.exit_code, {"failed_gates": e.failed}
        log(f"the retrained model was refused: {e}")
    except MlopsError as e:
        verdict, code, details = "failed", e.exit_code, {"error": str(e)[:2000]}
        log(f"retraining failed: {e}")
    reg.record("retrain_finished", model, version, need="retrain", verdict=verdict,
               reason=why, details={"data_version": data_version, **details})
    log(f"retraining {verdict}; production is {model}:"
        f"{reg.aliases(model).get('production')} (python -m jobs.registry history {model})")
    return code
