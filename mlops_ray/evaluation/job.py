"""jobs.evaluate: CV + held-out test + fairness (+ mitigation) + champion -> gates -> report.

Writes next to the run (under `<run>/eval/`): gate_report.json, model_card.md/.html, plots, and
one JSON per finished CV fold (reused on rerun).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlops_ray.data import Prepared, prepare
from mlops_ray.errors import ConfigError, DataValidationError, RunNotFound
from mlops_ray.evaluation import cv as cvmod
from mlops_ray.evaluation.metrics import binary_metrics
from mlops_ray.storage import Storage, resolve

SCORE_KEYS = ("auc", "pr_auc", "accuracy", "f1", "log_loss", "brier", "ece")


def resolve_run(uri: str, storage_cfg: dict[str, Any]) -> tuple[dict[str, Any], Storage]:
    """A run record and its folder, from a run folder, a run.json, or a tuning folder."""
    uri = uri.removesuffix("/run.json").removesuffix("/tune.json").rstrip("/")
    st = resolve(uri, storage_cfg.get("endpoint_url"), storage_cfg.get("region"))
    if st.exists("tune.json"):  # a tuning run: evaluate its best trial's run record
        best = st.read_json("tune.json").get("best") or {}
        if not best.get("run_uri"):
            raise RunNotFound(f"run={uri}: the tuning run has no finished best trial")
        return resolve_run(best["run_uri"], storage_cfg)
    if not st.exists("run.json"):
        raise RunNotFound(f"run={uri}: no run.json there (give a run folder, its run.json, or a "
                          "tuning folder)")
    rec = st.read_json("run.json")
    if rec.get("status") != "finished":
        raise RunNotFound(f"run={uri}: status is '{rec.get('status')}', not finished")
    return rec, st


def _checkpoint_dir(uri: str, storage_cfg: dict[str, Any], tmp: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    import pyarrow.fs as pafs
    src = resolve(uri, storage_cfg.get("endpoint_url"), storage_cfg.get("region"))
    pafs.copy_files(src.root, tmp, source_filesystem=src.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return Path(tmp)


class CheckpointProba:
    """Raw rows -> probabilities of a loaded checkpoint; picklable, so a fitted
    ThresholdOptimizer around it can be saved with the report."""

    def __init__(self, model: Any, pre: Any):
        self.model, self.pre = model, pre

    def __call__(self, rows: pd.DataFrame) -> np.ndarray:
        from mlops_ray.train import checkpoint as ckpt_io
        return ckpt_io.predict_proba(self.model, self.pre.transform(rows))


def load_run_model(rec: dict[str, Any], storage_cfg: dict[str, Any]) -> CheckpointProba:
    """A run's best checkpoint as raw rows -> probabilities (its own preprocessing)."""
    from mlops_ray.train import checkpoint as ckpt_io
    with tempfile.TemporaryDirectory() as tmp:
        model, pre, _ = ckpt_io.load_model(_checkpoint_dir(rec["checkpoints"]["best"],
                                                           storage_cfg, tmp))
    return CheckpointProba(model, pre)


def check_inputs(job: dict[str, Any], rec: dict[str, Any], prepared: Prepared) -> list[str]:
    """Sensitive attributes present, gate metrics known — before any work starts."""
    attrs = job["fairness"]["attributes"] or rec["config"]["dataset"]["sensitive"]
    missing = [a for a in attrs if a not in prepared.frame.columns]
    if missing:
        raise DataValidationError(rec["config"]["dataset"]["name"], [
            f"sensitive attribute(s) {missing} not in the dataset (columns: "
            f"{list(prepared.frame.columns)})"])
    return list(attrs)


def expand_rules(rules: list[dict[str, Any]], attrs: list[str]) -> list[dict[str, Any]]:
    out = []
    for r in rules:
        if "{attr}" in r["metric"] or "{attr}" in r["name"]:
            out += [{**r, "name": r["name"].format(attr=a), "metric": r["metric"].format(attr=a)}
                    for a in attrs]
        else:
            out.append(dict(r))
    return out


def run_evaluation(job: dict[str, Any], log: Any = print) -> dict[str, Any]:
    """Evaluate a run against the gates; writes the report and model card; returns the report.

    Every input is checked before any work starts (run exists, data unchanged, sensitive
    attributes present, gate metrics known)."""
    from mlops_ray.evaluation import card, fairness, stats
    from mlops_ray.evaluation import gates as gmod
    from mlops_ray.evaluation.threshold import choose_threshold
    from mlops_ray.runtime import code_version
    storage_cfg = job["storage"]
    rec, run_store = resolve_run(job["run"], storage_cfg)
    cfg = rec["config"]
    prepared = prepare(cfg["dataset"], cfg["seed"], storage=storage_cfg)
    if prepared.version != rec["dataset"]["version"]:
        raise DataValidationError(cfg["dataset"]["name"], [
            f"dataset version is {prepared.version} but the run was trained on "
            f"{rec['dataset']['version']}: the data at {cfg['dataset']['uri']} changed"])
    attrs = check_inputs(job, rec, prepared)
    rules = expand_rules(job["gates"]["rules"], attrs)
    gate_spec = {"rules": rules, "champion": job["gates"]["champion"]}
    gmod.validate_gates(gate_spec, gmod.metric_names(attrs))
    champion_rec = resolve_run(job["champion"], storage_cfg)[0] if job["champion"] else None
    fair_cfg = job["fairness"]
    mit_attr = fair_cfg["mitigation_attribute"] or attrs[0]
    if fair_cfg["mitigation"] != "none" and mit_attr not in attrs:
        raise ConfigError(f"fairness.mitigation_attribute={mit_attr!r}: not among the sensitive "
                          f"attributes {attrs}")

    # 1. cross-validation, folds stored under <run>/eval/cv/ and reused on rerun
    cvc = job["cv"]
    if cvc["parallel"]:
        from mlops_ray.runtime import ensure_ray
        ensure_ray(job["ray"])

    # a fold is reused only by an evaluation that would compute exactly the same fold
    tag = (f"k{cvc['folds']}-e{cvc['epochs'] or cfg['train']['epochs']}-s{cfg['seed']}-"
           f"{prepared.version[:8]}")

    def load(i: int) -> dict | None:
        name = f"fold_{i}-{tag}.json"
        return run_store.read_json("eval", "cv", name) if run_store.exists("eval", "cv", name) \
            else None

    def save(i: int, r: dict) -> None:
        run_store.write_json(r, "eval", "cv", f"fold_{i}-{tag}.json")
    folds = cvmod.cross_validate(cfg, prepared, cvc["folds"], parallel=cvc["parallel"],
                                 max_parallel=cvc["max_parallel"],
                                 cpus_per_fold=cvc["cpus_per_fold"], epochs=cvc["epochs"],
                                 load=load, save=save, log=log)
    cv_summary = cvmod.summarise(folds)

    # 2. held-out test at a threshold chosen on validation rows
    val_rows = prepared.frame.iloc[prepared.splits["val"]]
    test_rows = prepared.frame.iloc[prepared.splits["test"]]

    y_val, y_test = prepared.labels(val_rows).astype(int), prepared.labels(test_rows).astype(int)
    candidate = load_run_model(rec, storage_cfg)  # loaded once: val, test and mitigation
    p_val, p_test = candidate(val_rows), candidate(test_rows)
    thr = choose_threshold(y_val, p_val, job["threshold"]["objective"])
    test = binary_metrics(y_test, p_test, thr, prefix="test/")
    test_ci = {"test/auc": stats.bootstrap_ci(stats.roc_auc, y_test, p_test, n=job["n_boot"],
                                              strata=y_test)}
    for key, fn in (("test/accuracy", lambda y, p: float(((p >= thr) == y).mean())),
                    ("test/brier", lambda y, p: float(((p - y) ** 2).mean()))):
        test_ci[key] = stats.bootstrap_ci(fn, y_test, p_test, n=job["n_boot"], strata=y_test)
    y_pred = (p_test >= thr).astype(int)

    # 3. fairness on test rows, after the configured post-processing mitigation
    mitigation = None
    if fair_cfg["mitigation"] == "threshold":
        fitted = fairness.threshold_optimizer(candidate, val_rows, y_val, val_rows[mit_attr],
                                              constraint=fair_cfg["constraint"], seed=cfg["seed"])
        y_mit = fitted.predict(test_rows, sensitive_features=test_rows[mit_attr])
        mitigation = fairness.mitigation_summary(fitted, y_test, y_pred, y_mit,
                                                 test_rows[mit_attr])
        y_pred = y_mit
        # the gates judge the predictor that would be deployed: thresholded metrics from its labels
        from sklearn.metrics import f1_score
        test["test/accuracy"] = float((y_pred == y_test).mean())
        test["test/f1"] = float(f1_score(y_test, y_pred, zero_division=0))
        test_ci["test/accuracy"] = stats.bootstrap_ci(lambda y, q: float((q == y).mean()), y_test,
                                                      y_pred, n=job["n_boot"], strata=y_test)
        import pickle
        run_store.write_bytes(pickle.dumps(fitted), "eval", "threshold_optimizer.pkl")
        mitigation["artifact"] = run_store.uri_of("eval", "threshold_optimizer.pkl")
    elif cfg["train"].get("fairness_penalty", {}).get("kind", "none") != "none":
        mitigation = {"name": "fairness_penalty", **cfg["train"]["fairness_penalty"],
                      "requires_sensitive_at_prediction": False}
    fair = fairness.fairness_report(y_test, y_pred, test_rows[attrs],
                                    min_group_size=fair_cfg["min_group_size"],
                                    n_boot=fair_cfg["n_boot"], seed=cfg["seed"])

    # 4. champion on the same test rows, paired
    champion = None
    if champion_rec is not None:
        p_champ = load_run_model(champion_rec, storage_cfg)(test_rows)
        champion = gmod.compare_to_champion({"name": "champion", **job["gates"]["champion"]},
                                            y_test, p_test, p_champ, n_boot=job["n_boot"],
                                            seed=cfg["seed"])
        champion["run"] = champion_rec["run_uri"]

    # 5. gates -> report
    metrics = {**cv_summary, **test, **fair["metrics"]}
    cis = {**{k: (v["ci_low"], v["ci_high"]) for k, v in test_ci.items()}, **fair["cis"]}
    cis.update({f"cv/{m}_mean": (cv_summary[f"cv/{m}_ci_low"], cv_summary[f"cv/{m}_ci_high"])
                for m in ("auc", "pr_auc", "accuracy", "log_loss", "brier")})
    gate_spec_run = gate_spec if champion is not None else {"rules": rules}
    results = gmod.evaluate_gates(gate_spec_run, metrics, cis, champion)
    groups = {a: {str(k): int(v) for k, v in prepared.frame[a].astype(str).value_counts()
                  .items()} for a in attrs}
    report: dict[str, Any] = {
        "model": {"name": cfg["name"], "run": rec["run_name"],
                  "intended_use": f"binary prediction of '{prepared.label}' on "
                                  f"{cfg['dataset']['name']}-like tabular data; decision support "
                                  "with human review, not automated adverse decisions"},
        "lineage": {"run": rec["run_uri"], "data_version": rec["dataset"]["version"],
                    "config_hash": rec["config_hash"], "code_version": rec["code_version"],
                    "evaluated_with": code_version(), "tune": rec.get("tune")},
        "data": {"dataset": cfg["dataset"]["name"], "rows": rec["dataset"]["splits"],
                 "positive_rate": {"all": rec["dataset"]["positive_rate"],
                                   "test": float(y_test.mean())}, "groups": groups},
        "config": {k: cfg[k] for k in ("model", "optim", "train", "scaling", "seed")},
        "cv": {"k": cvc["folds"], "folds": folds, "summary": cv_summary},
        "test": {"metrics": test, "ci": {k: [v["ci_low"], v["ci_high"]]
                                        for k, v in test_ci.items()}},
        "threshold": {"objective": job["threshold"]["objective"], "value": thr,
                      "chosen_on": "validation rows"},
        "fairness": {k: v for k, v in fair.items() if k != "cis"},
        "mitigation": mitigation, "champion": champion,
        "gates": [r.to_dict() for r in results],
        "curves": card.downsample_curves(y_test, p_test),
    }
    report["passed"] = gmod.passed(report)
    with tempfile.TemporaryDirectory() as tmp:
        written = card.write_model_card(report, Path(tmp))
        for path in written.values():
            run_store.write_bytes(Path(path).read_bytes(), "eval", Path(path).name)
    report["model_card"] = run_store.uri_of("eval", "model_card.md")
    run_store.write_bytes(json.dumps(report, indent=1, default=float).encode(), "eval",
                          "gate_report.json")
    report["report_uri"] = run_store.uri_of("eval", "gate_report.json")
    return report
