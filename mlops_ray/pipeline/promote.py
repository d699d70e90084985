"""jobs.promote: run -> (evaluation against production) -> registry version -> aliases. The
registry itself only stores and guards; deciding what to register, and evaluating first when
the run's report does not hold for this promotion, is this orchestration's.

`production` moves only when the version's gates passed *and* its champion gate compared it with
the version production points at now; the evaluation is (re)run when the run has no report, or
its report compared against another champion or used other gate rules. The alias moves by
compare-and-swap from the value read before the evaluation started, so a promotion that raced
another one fails with RegistryConflict instead of overwriting it.
"""
from __future__ import annotations

import io
import json
import tempfile
from typing import Any

from mlops_ray.config.evaluate import PromoteJob
from mlops_ray.errors import GateFailed, PermissionDenied
from mlops_ray.registry import Registry, open_registry

# files of a registered version, all covered by its content hash
FILES = ("model.pt", "meta.json", "preprocessor.json", "signature.json", "reference.json",
         "config.json", "lineage.json", "gate_report.json", "model_card.md")


def signature(pre: Any, dataset: dict[str, Any], threshold: float,
              needs_sensitive: bool, decision: dict[str, Any] | None = None) -> dict[str, Any]:
    """Input/output contract: what serving validates requests against. The attribute the
    decision rule's post-processor needs is required, with the groups it knows (closed: an
    unknown group is a 4xx, never a guess)."""
    inputs = [{"name": c, "kind": "numeric", "datatype": "FP64", "required": True}
              for c in pre.numeric]
    inputs += [{"name": c, "kind": "categorical", "datatype": "BYTES", "required": True,
                "categories": pre.categories[c]} for c in pre.categorical]
    used = {i["name"] for i in inputs}
    pp = (decision or {}).get("postprocessor")
    optional = [{"name": c, "kind": "categorical", "datatype": "BYTES",
                 "required": bool(pp and pp["attribute"] == c), "role": "sensitive",
                 "mitigation_needs_it": bool(pp and pp["attribute"] == c) or needs_sensitive,
                 **({"categories": sorted(pp["groups"]), "closed": True}
                    if pp and pp["attribute"] == c else {})}
                for c in dataset["sensitive"] if c not in used]
    if pp and pp["attribute"] in used:  # a post-processor on a model input: close its groups
        for i in inputs:
            if i["name"] == pp["attribute"]:
                i.update(categories=sorted(pp["groups"]), closed=True)
    return {"inputs": inputs + optional,
            "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1]},
                        {"name": "label", "datatype": "INT64", "shape": [-1]}],
            "label": dataset["label"], "positive": dataset.get("positive", 1),
            "threshold": threshold}


def version_files(job: PromoteJob, rec: dict[str, Any], report: dict[str, Any],
                  prepared: Any = None) -> dict[str, bytes]:
    import torch

    from mlops_ray.artifacts import checkpoint as ckpt_io
    from mlops_ray.artifacts.runs import verified_checkpoint
    from mlops_ray.config.train import TrainJob
    from mlops_ray.data.profile import profile
    from mlops_ray.pipeline.evaluate import run_data
    from mlops_ray.storage import resolve
    cfg = rec["config"]
    storage = job.storage
    with tempfile.TemporaryDirectory() as tmp:
        d = verified_checkpoint(rec, "best", storage.plain(), tmp)
        model, pre, meta = ckpt_io.load_model(d)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)  # weights only: no optimizer state, no RNG
        files = {"model.pt": buf.getvalue(), "meta.json": (d / "meta.json").read_bytes(),
                 "preprocessor.json": (d / "preprocessor.json").read_bytes()}
    prepared = run_data(rec, TrainJob.stored(cfg), storage, prepared)
    train_rows = prepared.frame.iloc[prepared.splits["train"]]
    cats = list(dict.fromkeys(pre.categorical + [c for c in cfg["dataset"]["sensitive"]
                                                 if c in train_rows.columns]))
    mitigation = report.get("mitigation") or {}
    needs_sensitive = bool(mitigation.get("requires_sensitive_at_prediction"))
    lineage = {**report["lineage"], "run_name": rec["run_name"],
               "dataset_uri": cfg["dataset"]["uri"]}
    if cfg["dataset"].get("sources"):  # e.g. the prediction-log parts a retraining used
        lineage["data_sources"] = cfg["dataset"]["sources"]
    if prepared.features:  # the feature views joined, and their definitions' hash
        lineage["feature_store"] = prepared.features

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, indent=1, sort_keys=True, default=float).encode()
    from mlops_ray.artifacts import rule as rule_mod
    decision = report.get("rule") or rule_mod.plain(report["threshold"]["value"])
    sig = signature(pre, cfg["dataset"], report["threshold"]["value"], needs_sensitive, decision)
    if prepared.features:  # serving looks the features up by the join key (features/online.py)
        from mlops_ray.features.online import entity_spec
        key = prepared.frame[cfg["dataset"]["feast"]["join_key"]]
        sig["entity"] = entity_spec(cfg["dataset"]["feast"], prepared.features["store"],
                                    [i["name"] for i in sig["inputs"]],
                                    "int64" if key.dtype.kind in "iu" else "string")
    files.update({
        "rule.json": dumps(decision),  # the rule the gates judged (hash in the signed report)
        "signature.json": dumps(sig),
        "reference.json": dumps(profile(train_rows, pre.numeric, cats, seed=cfg["seed"])),
        "config.json": dumps(cfg), "lineage.json": dumps(lineage),
        "gate_report.json": dumps({k: v for k, v in report.items() if k != "curves"}),
    })
    card = resolve(report["model_card"].rsplit("/", 1)[0], storage.endpoint_url, storage.region)
    files["model_card.md"] = card.read_bytes("model_card.md")
    return files


def headline(report: dict[str, Any]) -> dict[str, Any]:
    t, cv = report["test"]["metrics"], report["cv"]["summary"]
    return {"test/auc": t.get("test/auc"), "test/accuracy": t.get("test/accuracy"),
            "cv/auc_mean": cv.get("cv/auc_mean"),
            "failed_gates": [g["name"] for g in report["gates"] if not g["passed"]]}


def promote(job: PromoteJob, log: Any = print, registry: Registry | None = None,
            prepared: Any = None) -> dict[str, Any]:
    """Register the run as a version; move `production` to it when its gates passed (and the
    approval is automatic). `prepared`: the pipeline's data, reused when it is the run's."""
    from mlops_ray.artifacts.runs import resolve_run
    from mlops_ray.evaluation import gates as gmod
    from mlops_ray.pipeline.evaluate import run_evaluation, stored_report
    reg = registry or open_registry(job)
    p = job.promote
    rec, run_store = resolve_run(job.run, job.storage.plain())
    model = p.model or rec["config"]["name"]
    prod = reg.alias_target(model, "production")
    expected = prod.version if prod else None  # the CAS token: production as we found it
    champion_run = prod.run_uri if prod else None
    if prod is not None and prod.run_uri == rec["run_uri"]:
        log(f"{rec['run_name']} is already {model}@production ({prod.ref}); nothing to do")
        return {"model": model, "version": prod.version, "passed": prod.gate_passed,
                "production_before": expected, "production": expected,
                "artifact": prod.artifact_uri, "report": None, "table": ""}
    report, why = stored_report(job.evaluate_job(), rec, run_store, champion_run)
    if report is None:
        log(f"evaluating {rec['run_name']} first: {why}")
        report = run_evaluation(job.evaluate_job(champion=champion_run), log=log,
                                prepared=prepared)
    v = reg.register(model, version_files(job, rec, report, prepared), {
        "run_uri": rec["run_uri"], "run_name": rec["run_name"],
        "data_version": rec["dataset"]["version"], "dataset_uri": rec["config"]["dataset"]["uri"],
        "config_hash": rec["config_hash"], "code_version": rec["code_version"],
        "study": rec.get("tune"), "gate_passed": bool(report["passed"]),
        "champion_run": champion_run, "metrics": headline(report)})
    log(f"registered {v.ref} ({'gates passed' if v.gate_passed else 'gates FAILED'}) "
        f"at {v.artifact_uri}")
    for alias in p.aliases:
        reg.set_alias(model, alias, v.version, reason=p.reason)
    table = gmod.verdict_table(report["gates"])
    out: dict[str, Any] = {"model": model, "version": v.version, "passed": v.gate_passed,
                           "production_before": expected, "production": expected,
                           "artifact": v.artifact_uri, "report": report, "table": table}
    if p.approval == "manual":
        log(f"approval is manual: production stays at {expected}; an approver runs\n"
            f"  python -m jobs.registry approve {v.ref} --reason '...'")
        return out
    try:
        reg.set_alias(model, "production", v.version, expected=expected, reason=p.reason,
                      force=p.force)
    except PermissionDenied:
        if not v.gate_passed and not p.force:
            raise GateFailed(headline(report)["failed_gates"], table + (
                f"\n{v.ref} is registered; production stays at {expected}")) from None
        raise
    out["production"] = v.version
    log(f"{model}@production: {expected} -> {v.version}")
    return out
