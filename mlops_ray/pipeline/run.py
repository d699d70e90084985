"""`jobs.pipeline`: a model's whole way to production in one command.

    train (or tune) -> evaluate -> promote -> deploy (canary on Serve) -> smoke -> summary

Every stage's output has a URI (run folder, gate report, registry version, Serve app), and a
stage is skipped when its output exists for the same inputs, so a pipeline killed anywhere
resumes at the stage it was in: training also resumes from its last checkpoint, evaluation
reuses its finished folds. A failed gate stops the pipeline before promotion (exit 5), audited.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from mlops_ray.errors import ConfigError, GateFailed, MlopsError

STAGES = ("train", "evaluate", "promote", "deploy", "smoke")


class SmokeFailed(MlopsError):
    """The live endpoint did not answer held-out rows as the registry version does."""

    exit_code = 10


def subjob(job: dict[str, Any], schema: Any, **extra: Any) -> dict[str, Any]:
    """The part of the pipeline config another job's schema knows, validated by that schema (so
    a run trained here has the same name and hash as one from `jobs.train`)."""
    fields = schema.model_fields
    return schema.model_validate({**{k: v for k, v in job.items() if k in fields}, **extra}
                                 ).model_dump(by_alias=True)


def serve_job(job: dict[str, Any], model: str) -> dict[str, Any]:
    from mlops_ray.config.schema import ServeJobCfg
    return subjob(job, ServeJobCfg, model=model, alias="production")


def endpoint(sj: dict[str, Any]) -> str:
    s = sj["serve"]
    return f"http://{s['host']}:{s['port']}{s['route_prefix'].rstrip('/')}"


class Stages:
    """Runs stages in order, timing each and recording done / skipped / failed."""

    def __init__(self, names: list[str], log: Callable[[str], Any]):
        self.names, self.log = names, log
        self.done: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        n = self.names.index(name) + 1 if name in self.names else len(self.done) + 1
        self.log(f"== [{n}/{len(self.names)}] {name}")
        entry: dict[str, Any] = {"stage": name, "status": "done", "output": None, "note": ""}
        self.done.append(entry)
        t0 = time.perf_counter()
        try:
            yield entry
        except BaseException as e:
            entry["status"] = "failed"
            entry["note"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            if entry["status"] == "skipped":
                self.log(f"   skipped: {entry['note']}")



def stage_table(done: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<9} {'status':<8} {'s':>7}  output"]
    for e in done:
        lines.append(f"{e['stage']:<9} {e['status']:<8} {e.get('seconds', 0):>7.1f}  "
                     f"{e['output'] or ''}{'  (' + e['note'] + ')' if e['note'] else ''}")
    return "\n".join(lines)


def run_pipeline(job: dict[str, Any], log: Callable[[str], Any] = print,
                 prepared: Any = None) -> dict[str, Any]:
    """Run the configured stages from a validated PipelineJobCfg dict (`prepared`: its dataset,
    when the caller has loaded and validated it already). Returns the pipeline record (also
    written next to the run as pipeline.json). Raises GateFailed (exit 5) when the gates refuse
    the candidate, ServeError / SmokeFailed (exit 10) when serving it fails."""
    from mlops_ray.data import prepare
    from mlops_ray.registry import open_registry
    from mlops_ray.storage import resolve
    names = [("tune" if s == "train" and job["tune"]["enabled"] else s) for s in job["stages"]]
    st = Stages(names, log)
    reg = open_registry(job)  # a bad database URL fails before any work
    model = job["promote"]["model"] or job["name"]
    # data validated before Ray starts; training reuses it
    prepared = prepared or prepare(job["dataset"], job["seed"], storage=job["storage"])
    out: dict[str, Any] = {"model": model, "stages": st.done, "run": job["run"],
                           "data_version": prepared.version, "trigger": job["trigger"]}
    try:
        run_uri = job["run"]
        if "train" in job["stages"]:
            run_uri = (_tune if job["tune"]["enabled"] else _train)(job, prepared, st, log)
        if run_uri is None:
            raise ConfigError("run: stages without train need run=<run folder or tuning folder>")
        from mlops_ray.evaluation.job import resolve_run
        rec, run_store = resolve_run(run_uri, job["storage"])
        out["run"] = rec["run_uri"]
        prod = reg.alias_target(model, "production")
        already = prod is not None and prod.run_uri == rec["run_uri"]
        if "evaluate" in job["stages"]:
            out["report"] = _evaluate(job, rec, run_store, reg, model, prod, already, st, log)
        if "promote" in job["stages"]:
            out["version"] = _promote(job, rec, reg, model, prod, already, st, log)
        if "deploy" in job["stages"]:
            out["serving"] = _deploy(job, reg, model, prepared, st, log)
        if "smoke" in job["stages"]:
            out["smoke"] = _smoke(job, reg, model, prepared, st, log)
    except BaseException:
        log(stage_table(st.done))  # where it stopped; the error follows
        raise
    finally:
        if out["run"]:
            try:
                resolve(out["run"], job["storage"].get("endpoint_url"),
                        job["storage"].get("region")).write_json(
                    {k: v for k, v in out.items() if k != "report"}, "pipeline.json")
            except Exception as e:  # noqa: BLE001 - never hide the stage's own error
                log(f"warning: pipeline record not written: {e}")
    return out


# ------------------------------------------------------------------------------------- stages
def _train(job: dict[str, Any], prepared: Any, st: Stages, log: Callable[[str], Any]) -> str:
    from mlops_ray.config.schema import TrainJobCfg
    from mlops_ray.storage import from_cfg
    from mlops_ray.train.trainer import run_name_for, run_training, summary_lines
    cfg = subjob(job, TrainJobCfg)
    storage = from_cfg(cfg["storage"])
    name = run_name_for(cfg, prepared.version)
    with st.stage("train") as e:
        e["output"] = storage.uri_of("runs", name)
        if storage.exists("runs", name, "run.json") and \
                storage.read_json("runs", name, "run.json").get("status") == "finished":
            e.update(status="skipped", note="finished run with this config and data")
            return e["output"]
        rec = run_training(cfg, prepared=prepared, log=log)
        log("\n".join("   " + line for line in summary_lines(rec)))
        return rec["run_uri"]


def _tune(job: dict[str, Any], prepared: Any, st: Stages, log: Callable[[str], Any]) -> str:
    from mlops_ray.config.schema import TuneJobCfg
    from mlops_ray.storage import from_cfg
    from mlops_ray.tune.tuner import run_tuning, study_name, summary_lines
    t = {k: v for k, v in job["tune"].items() if k != "enabled"}
    # ASHA stops trials early; the run's own early stopping would fight it
    cfg = subjob(job, TuneJobCfg, tune=t, train={**job["train"], "early_stopping": None})
    storage = from_cfg(cfg["storage"])
    study = study_name(cfg, prepared.version)
    with st.stage("tune") as e:
        e["output"] = storage.uri_of("tune", study)
        if storage.exists("tune", study, "tune.json") and \
                (storage.read_json("tune", study, "tune.json").get("best") or {}).get("run_uri"):
            e.update(status="skipped", note="finished study with this config and data")
            return e["output"]
        summary = run_tuning(cfg, prepared=prepared, log=log)
        log("\n".join("   " + line for line in summary_lines(summary)))
        if not summary.get("best"):
            raise MlopsError(f"study {study}: no trial finished; nothing to evaluate")
        return summary["tune_uri"]


def _evaluate(job: dict[str, Any], rec: dict[str, Any], run_store: Any, reg: Any, model: str,
              prod: Any, already: bool, st: Stages, log: Callable[[str], Any]
              ) -> dict[str, Any] | None:
    from mlops_ray.config.schema import EvaluateJobCfg
    from mlops_ray.evaluation.gates import verdict_table
    from mlops_ray.evaluation.job import expand_rules, run_evaluation
    from mlops_ray.registry.promote import needs_evaluation
    with st.stage("evaluate") as e:
        if already:
            e.update(status="skipped", note=f"{prod.ref} is production already")
            return None
        champion = prod.run_uri if prod else None  # the candidate must not be worse than it
        ej = subjob(job, EvaluateJobCfg, run=rec["run_uri"], champion=champion)
        report = run_store.read_json("eval", "gate_report.json") \
            if run_store.exists("eval", "gate_report.json") else None
        attrs = job["fairness"]["attributes"] or rec["config"]["dataset"]["sensitive"]
        why = needs_evaluation(report, rec, champion, expand_rules(job["gates"]["rules"], attrs))
        if why is None and report is not None:
            e.update(status="skipped", note="gate report is current")
            report["report_uri"] = run_store.uri_of("eval", "gate_report.json")
            report["model_card"] = run_store.uri_of("eval", "model_card.md")
        else:
            log(f"   evaluating: {why}")
            report = run_evaluation(ej, log=log)
        e["output"] = report["report_uri"]
        table = verdict_table(report["gates"])
        log(table)
        if not report["passed"]:
            failed = [g["name"] for g in report["gates"] if not g["passed"]]
            e["note"] = f"gates failed: {', '.join(failed)}"
            reg.record("pipeline_refused", model, None, need="register",
                       reason=f"gates failed: {', '.join(failed)}", verdict="failed",
                       details={"run": rec["run_uri"], "report": report["report_uri"],
                                "trigger": job["trigger"], "champion": champion,
                                "failed": {g["name"]: g.get("value") for g in report["gates"]
                                           if not g["passed"]}})
            raise GateFailed(failed, f"model card {report['model_card']}\nthe pipeline "
                             f"stopped before promotion; production is unchanged "
                             f"({prod.ref if prod else 'unset'})")
        return report


def _promote(job: dict[str, Any], rec: dict[str, Any], reg: Any, model: str, prod: Any,
             already: bool, st: Stages, log: Callable[[str], Any]) -> int | None:
    from mlops_ray.config.schema import PromoteJobCfg
    from mlops_ray.registry.promote import promote
    with st.stage("promote") as e:
        if already:
            e.update(status="skipped", note=f"{prod.ref} is production already",
                     output=prod.artifact_uri)
            return int(prod.version)
        reason = job["promote"]["reason"] or (f"jobs.pipeline ({job['trigger']})"
                                              if job["trigger"] else None)
        pj = subjob(job, PromoteJobCfg, run=rec["run_uri"],
                    promote={**job["promote"], "model": model, "reason": reason})
        res = promote(pj, log=lambda m: log(f"   {m}"), registry=reg)
        e["output"] = f"{model}:{res['version']} ({res['artifact']})"
        if res["production"] != res["version"]:
            e["note"] = "approval is manual: production unchanged"
        return int(res["version"])


def _deploy(job: dict[str, Any], reg: Any, model: str, prepared: Any, st: Stages,
            log: Callable[[str], Any]) -> dict[str, Any]:
    from mlops_ray.serving import control
    sj = serve_job(job, model)
    with st.stage("deploy") as e:
        prod = reg.get(f"{model}@production")
        facts = control.start(sj)
        e["output"] = f"{endpoint(sj)}/predict -> {prod.ref}"
        cur = control.current_routing(sj)
        served = [a["ref"] for a in cur["arms"]] if cur else []
        if served == [prod.ref]:
            e.update(status="skipped", note=f"'{control.app_name(sj)}' serves {prod.ref}")
        elif cur:
            strategy = job["serve"]["rollout"]["strategy"]
            # the canary is judged on requests: held-out rows flow while it bakes
            with _traffic(sj, reg, prepared, prod, strategy == "canary"):
                control.rollout(sj, reg, "production", strategy, log=lambda m: log(f"   {m}"))
        else:
            control.serve_alias(sj, reg, "production", log=lambda m: log(f"   {m}"))
        return {"endpoint": endpoint(sj), "app": control.app_name(sj), "version": prod.ref,
                "dashboard": facts["dashboard_url"], "ray_address": facts["address"]}


def held_out_records(prepared: Any, signature: dict[str, Any], n: int) -> tuple[list[dict], Any]:
    """Held-out test rows as request records (the signature's columns, NaN -> null)."""
    cols = [f["name"] for f in signature["inputs"]]
    rows = prepared.frame.iloc[prepared.splits["test"][:n]]
    frame = rows[cols].astype(object).where(rows[cols].notna(), None)
    return frame.to_dict("records"), rows


@contextmanager
def _traffic(sj: dict[str, Any], reg: Any, prepared: Any, v: Any, on: bool) -> Iterator[None]:
    """Replay held-out rows against the endpoint in the background while the block runs."""
    if not on:
        yield
        return
    import requests
    sig = json.loads((reg.fetch(v.ref)[1] / "signature.json").read_text())
    records, _ = held_out_records(prepared, sig, 2000)
    stop, url = threading.Event(), f"{endpoint(sj)}/predict"

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


def _smoke(job: dict[str, Any], reg: Any, model: str, prepared: Any, st: Stages,
           log: Callable[[str], Any]) -> dict[str, Any]:
    """Held-out rows through the live endpoint: every answer 200, from the production version,
    equal to what the registry version computes offline."""
    import requests

    from mlops_ray.serving.predictor import Predictor
    sj = serve_job(job, model)
    with st.stage("smoke") as e:
        prod, folder = reg.fetch(f"{model}@production")
        sig = json.loads((folder / "signature.json").read_text())
        records, rows = held_out_records(prepared, sig, job["smoke"]["rows"])
        expected = Predictor.load(folder, prod.ref).predict_proba(rows)
        url, got, chunk = f"{endpoint(sj)}/predict", [], job["serve"]["limits"]["max_rows"]
        headers = {}
        from mlops_ray.serving.control import api_keys
        if keys := api_keys(job["serve"]["auth"]):
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
        diff = float(np.max(np.abs(np.asarray(got) - expected))) if got else 0.0
        if diff > 1e-5:
            raise SmokeFailed(f"smoke test: served probabilities differ from {prod.ref} "
                              f"computed offline by up to {diff:.2g}")
        ms = (time.perf_counter() - t0) * 1000
        e["output"] = f"{len(got)} held-out rows, max |diff| {diff:.1g}, {ms:.0f} ms"
        return {"rows": len(got), "max_abs_diff": diff, "ms": round(ms, 1)}


def summary_lines(out: dict[str, Any]) -> list[str]:
    lines = [stage_table(out["stages"]), ""]
    rep = out.get("report") or {}
    if rep.get("model_card"):
        lines.append(f"model card {rep['model_card']}")
    if out.get("version") is not None:
        lines.append(f"registry   {out['model']}:{out['version']}  (python -m jobs.registry "
                     f"history {out['model']})")
    if srv := out.get("serving"):
        lines.append(f"endpoint   {srv['endpoint']}/predict  {srv['endpoint']}/v2/models/"
                     f"{out['model']}/infer  ({srv['version']})")
        lines.append(f"dashboard  {srv['dashboard'] or '(the cluster dashboard)'}")
        lines.append(f"ray        {srv['ray_address']}  (other jobs join it with ray.address="
                     f"{srv['ray_address']}, e.g. jobs.monitor, jobs.serve status)")
    if out.get("run"):
        lines.append(f"run        {out['run']}  (pipeline.json)")
    return lines
