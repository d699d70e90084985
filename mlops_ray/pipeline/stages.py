"""The pipeline's stages, each `stage(ctx) -> its output` on the shared Context (run.py): the
job each stands for runs in this process, seen through that job's own schema, so a run trained
here has the name and hash `jobs.train` would give it."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from mlops_ray.errors import GateFailed, MlopsError, SmokeFailed

if TYPE_CHECKING:
    from mlops_ray.pipeline.context import Context


def train(ctx: Context) -> str:
    from mlops_ray.storage import from_cfg
    from mlops_ray.train.driver import run_training, summary_lines
    job = ctx.job.train_job()
    storage = from_cfg(job.storage.plain())
    name = job.run_name(ctx.prepared.version)
    with ctx.stage("train") as e:
        e["output"] = storage.uri_of("runs", name)
        if storage.exists("runs", name, "run.json") and \
                storage.read_json("runs", name, "run.json").get("status") == "finished":
            e.update(status="skipped", note="finished run with this config and data")
            return e["output"]
        start_folds_ahead(ctx, job)
        rec = run_training(job, prepared=ctx.prepared, log=ctx.log)
        ctx.log("\n".join("   " + line for line in summary_lines(rec)))
        return rec["run_uri"]


def start_folds_ahead(ctx: Context, job: Any) -> None:
    """CV folds start on Ray, one at a time, while the run trains (`FoldsAhead`): evaluate
    takes them over. Not for a raced candidate (raced ones train side by side already)."""
    cvc = ctx.job.cv
    if "evaluate" not in ctx.job.stages or ctx.tag or not (cvc.parallel and cvc.during_training):
        return
    from mlops_ray.config.base import redact
    from mlops_ray.config.train import TrainJob
    from mlops_ray.train.folds import FoldsAhead

    def folds() -> list[Any]:  # on FoldsAhead's thread
        from mlops_ray.evaluation.cv import fold_indices
        return fold_indices(ctx.prepared, cvc.folds, job.seed)
    # the config as the run records it, as evaluation will read it back (train/driver.py)
    recorded = TrainJob.stored(redact(job.plain()))
    run_cpus = job.scaling.bounds()[1] * job.scaling.per_worker("CPU")
    ctx.folds_ahead = FoldsAhead(recorded, ctx.prepared, folds, cpus_per_fold=cvc.cpus_per_fold,
                                 epochs=cvc.epochs, run_cpus=run_cpus)


def drop_folds_ahead(ctx: Context) -> None:
    """Folds started beside the run that no evaluation took over are cancelled; never raises
    (a pipeline's own error is the one to see)."""
    ahead, ctx.folds_ahead = ctx.folds_ahead, None
    if ahead is None:
        return
    try:
        ahead.cancel()
    except Exception as e:  # noqa: BLE001
        ctx.log(f"warning: CV folds started beside the run not cancelled ({type(e).__name__}: "
                f"{e}); they end on their own")


def tune(ctx: Context) -> str:
    from mlops_ray.storage import from_cfg
    from mlops_ray.tune.tuner import run_tuning, study_name, summary_lines
    job = ctx.job.tune_job()
    storage = from_cfg(job.storage.plain())
    study = study_name(job, ctx.prepared.version)
    with ctx.stage("tune") as e:
        e["output"] = storage.uri_of("tune", study)
        if storage.exists("tune", study, "tune.json") and \
                (storage.read_json("tune", study, "tune.json").get("best") or {}).get("run_uri"):
            e.update(status="skipped", note="finished study with this config and data")
            return e["output"]
        summary = run_tuning(job, prepared=ctx.prepared, log=ctx.log)
        ctx.log("\n".join("   " + line for line in summary_lines(summary)))
        if not summary.get("best"):
            raise MlopsError(f"study {study}: no trial finished; nothing to evaluate")
        return summary["tune_uri"]


def evaluate(ctx: Context) -> dict[str, Any] | None:
    from mlops_ray.evaluation.gates import verdict_table
    from mlops_ray.pipeline.evaluate import run_evaluation, stored_report
    prod, rec = ctx.prod, ctx.rec
    with ctx.stage("evaluate") as e:
        if ctx.already:
            drop_folds_ahead(ctx)
            e.update(status="skipped", note=f"{prod.ref} is production already")
            return None
        champion = prod.run_uri if prod else None  # the candidate must not be worse than it
        ej = ctx.job.evaluate_job(rec["run_uri"], champion)
        report, why = stored_report(ej, rec, ctx.run_store, champion)
        if report is not None:
            drop_folds_ahead(ctx)
            e.update(status="skipped", note="gate report is current")
        else:
            ctx.log(f"   evaluating: {why}")
            # Serve starts while this process alone judges the test rows (not for a raced
            # candidate: the race's winner is not known yet)
            early = (lambda: start_serve_early(ctx)) if (
                "deploy" in ctx.job.stages and not ctx.tag) else None
            report = run_evaluation(ej, log=ctx.log, prepared=ctx.prepared, after_cv=early,
                                    ahead=ctx.folds_ahead)
            ctx.folds_ahead = None
        e["output"] = report["report_uri"]
        ctx.report = report
        ctx.log(verdict_table(report["gates"]))
        if not report["passed"]:
            failed = [g["name"] for g in report["gates"] if not g["passed"]]
            e["note"] = f"gates failed: {', '.join(failed)}"
            ctx.reg.record("pipeline_refused", ctx.model, None, need="register",
                           reason=f"gates failed: {', '.join(failed)}", verdict="failed",
                           details={"run": rec["run_uri"], "report": report["report_uri"],
                                    "trigger": ctx.job.trigger, "champion": champion,
                                    "failed": {g["name"]: g.get("value")
                                               for g in report["gates"] if not g["passed"]}})
            raise GateFailed(failed, f"model card {report['model_card']}\nthe pipeline "
                             f"stopped before promotion; production is unchanged "
                             f"({prod.ref if prod else 'unset'})")
        return report


def promote(ctx: Context) -> int | None:
    from mlops_ray.pipeline.promote import promote as register
    job, prod = ctx.job, ctx.prod
    with ctx.stage("promote") as e:
        if ctx.already:
            e.update(status="skipped", note=f"{prod.ref} is production already",
                     output=prod.artifact_uri)
            return int(prod.version)
        reason = job.promote.reason or (f"jobs.pipeline ({job.trigger})" if job.trigger
                                        else None)
        pj = job.promote_job(ctx.rec["run_uri"], model=ctx.model, reason=reason)
        res = register(pj, log=lambda m: ctx.log(f"   {m}"), registry=ctx.reg,
                       prepared=ctx.prepared)
        e["output"] = f"{ctx.model}:{res['version']} ({res['artifact']})"
        if res["production"] != res["version"]:
            e["note"] = "approval is manual: production unchanged"
        return int(res["version"])


def start_serve_early(ctx: Context) -> None:
    """Start Serve's controller and proxy on a thread while evaluation's own work runs after
    cross-validation (one core busy), so that deploy only adds the app: most of Serve's start
    is process starts. Only on a Ray this process is already attached to, and only when Serve
    does not run there yet; deploy waits for it (`serve_started`), and a pipeline that ends
    before deploy removes what it started (`drop_early_serve`)."""
    import threading

    import ray

    from mlops_ray.serving import control
    if not ray.is_initialized() or control.serve_running():
        return
    sj = ctx.job.serve_job()
    control.serve_env(sj)  # on this thread: the other one then only reads the environment
    outcome: dict[str, Any] = {}

    def start() -> None:
        try:
            outcome["facts"] = control.start(sj)
        except Exception as e:  # noqa: BLE001 - handed to deploy, which raises it
            outcome["error"] = e
    thread = threading.Thread(target=start, name="serve-start", daemon=True)
    thread.start()
    ctx.serve_start = (thread, outcome)


def serve_started(ctx: Context, timeout_s: float = 300) -> dict[str, Any] | None:
    """Deploy's wait for Serve's early start: its cluster facts, None when it did not run; its
    error is raised here, as `control.start` would have raised it."""
    if ctx.serve_start is None:
        return None
    from mlops_ray.errors import ServeError
    thread, outcome = ctx.serve_start
    thread.join(timeout_s)
    ctx.serve_start = None
    if thread.is_alive():
        raise ServeError(f"Serve's controller and proxy did not start within {timeout_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    facts: dict[str, Any] = outcome["facts"]
    return facts


def drop_early_serve(ctx: Context, timeout_s: float = 300) -> None:
    """The pipeline ends without deploying (a refused candidate, a failure): Serve, which this
    job started early and nothing uses, is shut down again; never raises."""
    if ctx.serve_start is None:
        return
    thread, outcome = ctx.serve_start
    thread.join(timeout_s)
    ctx.serve_start = None
    if thread.is_alive() or "facts" not in outcome:
        return
    try:
        from ray import serve
        serve.shutdown()
    except Exception as e:  # noqa: BLE001 - never hide why the pipeline ended
        ctx.log(f"warning: Serve, started for a deploy that did not come, is still running "
                f"({type(e).__name__}: {e}); make stop ends it")


def deploy(ctx: Context) -> dict[str, Any]:
    from mlops_ray.serving import control, rollout
    sj = ctx.job.serve_job()
    with ctx.stage("deploy") as e:
        prod = ctx.reg.get(f"{ctx.model}@production")
        if ctx.job.dataset.feast is not None:  # entity-keyed requests read the online store
            from mlops_ray.data.featurestore import FeatureRepo
            FeatureRepo(ctx.job.dataset.feast, ctx.job.storage.uri).materialize()
        facts = serve_started(ctx) or control.start(sj)
        e["output"] = f"{sj.endpoint()}/predict -> {prod.ref}"
        cur = control.current_routing(sj)
        served = [a["ref"] for a in cur["arms"]] if cur else []
        for arm in cur["arms"] if cur else []:
            if arm["ref"] == prod.ref and arm.get("content_hash") != prod.content_hash:
                # the same name and number from another registry (another storage.uri on
                # this cluster): a skip or a rollout would keep serving the other model
                from mlops_ray.errors import ServeError
                raise ServeError(
                    f"serve.app_name='{sj.app_name}' on this cluster serves {prod.ref} with "
                    f"content {str(arm.get('content_hash'))[:16]}…, from another registry; "
                    f"this registry's {prod.ref} is {prod.content_hash[:16]}…: give this "
                    "pipeline its own serve.app_name, or remove the other app first "
                    "(make stop, or serve.delete on the cluster)")
        if served == [prod.ref]:
            e.update(status="skipped", note=f"'{sj.app_name}' serves {prod.ref}")
        elif cur:
            strategy = sj.serve.rollout.strategy
            # the canary is judged on requests: held-out rows flow while it bakes
            with _traffic(ctx, sj, prod, strategy == "canary"):
                rollout.rollout(sj, ctx.reg, "production", strategy,
                                log=lambda m: ctx.log(f"   {m}"))
        else:
            rollout.serve_alias(sj, ctx.reg, "production", log=lambda m: ctx.log(f"   {m}"))
        direct = control.direct_endpoint(sj)
        if direct:
            e["output"] += f" (direct, no proxy hop: {direct}/predict)"
        return {"endpoint": sj.endpoint(), "direct_endpoint": direct, "app": sj.app_name,
                "version": prod.ref, "dashboard": facts["dashboard_url"],
                "ray_address": facts["address"]}


def held_out_records(prepared: Any, signature: dict[str, Any], n: int) -> tuple[list[dict], Any]:
    """Held-out test rows as request records (the signature's columns, NaN -> null). For a
    feature-store model: the rows' entity keys, and as rows the offline point-in-time join at
    the time the online store was materialized to (what it must answer with: the smoke test is
    then a skew check; stream events applied after that would make it fail, rightly)."""
    cols = [f["name"] for f in signature["inputs"]]
    rows = prepared.frame.iloc[prepared.splits["test"][:n]]
    if "entity" in signature:
        import pandas as pd

        from mlops_ray.config.features import FeastCfg
        from mlops_ray.data.featurestore import FeatureRepo
        ent = signature["entity"]
        cfg = FeastCfg.model_validate({**ent["feast"], "path": ent["store"]})
        keys = rows[cfg.join_key].drop_duplicates()
        repo = FeatureRepo(cfg)
        at = pd.Timestamp(repo.materialized_to() or pd.Timestamp.now(tz="UTC"))
        frame = pd.DataFrame({cfg.join_key: keys.to_numpy(), cfg.timestamp_field: at})
        return [{cfg.join_key: k.item() if hasattr(k, "item") else k} for k in keys], \
            repo.training_frame(frame)
    frame = rows[cols].astype(object).where(rows[cols].notna(), None)
    return frame.to_dict("records"), rows


@contextmanager
def _traffic(ctx: Context, sj: Any, v: Any, on: bool) -> Iterator[None]:
    """Replay held-out rows against the endpoint in the background while the block runs."""
    if not on:
        yield
        return
    import requests
    sig = json.loads((ctx.reg.fetch(v.ref)[1] / "signature.json").read_text())
    records, _ = held_out_records(ctx.prepared, sig, 2000)
    stop, url = threading.Event(), f"{sj.endpoint()}/predict"

    def loop() -> None:
        s, i = requests.Session(), 0
        while not stop.is_set():
            try:
                s.post(url, json={"records": records[i:i + 8]}, timeout=10)
            except requests.RequestException:
                stop.wait(0.2)
            i = (i + 8) % (len(records) - 8)
            stop.wait(0.02)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=15)


def smoke(ctx: Context) -> dict[str, Any]:
    """Held-out rows through the live endpoint: every answer 200, from the production version,
    equal to what the registry version computes offline."""
    import requests

    from mlops_ray.artifacts.predictor import Predictor
    from mlops_ray.serving.auth import api_keys
    sj = ctx.job.serve_job()
    with ctx.stage("smoke") as e:
        prod, folder = ctx.reg.fetch(f"{ctx.model}@production")
        sig = json.loads((folder / "signature.json").read_text())
        records, rows = held_out_records(ctx.prepared, sig, ctx.job.smoke.rows)
        # what the gates judged: the version's probabilities and its decision rule's labels
        expected, expected_y = Predictor.load(folder, prod.ref).predict(rows)
        from mlops_ray.serving.control import direct_endpoint
        base = direct_endpoint(sj, timeout=5) or sj.endpoint()  # the path clients should use
        url, got, got_y, chunk = f"{base}/predict", [], [], sj.serve.limits.max_rows
        headers = {}
        if keys := api_keys(sj.serve.auth):
            headers["Authorization"] = f"Bearer {keys[0]}"
        t0 = time.perf_counter()
        for i in range(0, len(records), chunk):
            r = requests.post(url, json={"records": records[i:i + chunk]}, headers=headers,
                              timeout=60)
            if r.status_code != 200:
                raise SmokeFailed(f"smoke test: {url} answered {r.status_code}: {r.text[:300]}")
            body = r.json()
            if body["version"] != prod.version:
                raise SmokeFailed(f"smoke test: answered by version {body['version']}, "
                                  f"production is {prod.ref}")
            got += body["probabilities"]
            got_y += body["labels"]
        diff = float(np.max(np.abs(np.asarray(got) - expected))) if got else 0.0
        if diff > 1e-5:
            raise SmokeFailed(f"smoke test: served probabilities differ from {prod.ref} "
                              f"computed offline by up to {diff:.2g}")
        flipped = int((np.asarray(got_y) != expected_y).sum())
        if flipped:
            raise SmokeFailed(f"smoke test: {flipped} served label(s) differ from {prod.ref}'s "
                              "judged decision rule")
        ms = (time.perf_counter() - t0) * 1000
        e["output"] = f"{len(got)} held-out rows, max |diff| {diff:.1g}, {ms:.0f} ms"
        return {"rows": len(got), "max_abs_diff": diff, "ms": round(ms, 1)}
