"""jobs.evaluate end to end: CV folds trained on Ray (train/folds.py) + held-out test +
fairness (+ mitigation) + champion, judged by evaluation's Ray-free core -> gates -> report.

Writes next to the run (under `<run>/eval/`): gate_report.json, model_card.md/.html, plots, and
one JSON per finished CV fold (reused on rerun).
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlops_ray.artifacts.runs import load_run_model, resolve_run
from mlops_ray.config.evaluate import EvaluateJob
from mlops_ray.config.train import TrainJob
from mlops_ray.data import Prepared, prepare
from mlops_ray.errors import ConfigError, DataValidationError
from mlops_ray.evaluation import cv as cvmod
from mlops_ray.evaluation.metrics import binary_metrics


def signing_key(job: EvaluateJob) -> bytes:
    """The registry's key, which signs what evaluation writes (registry/signing.py)."""
    from mlops_ray.db import db_url
    from mlops_ray.registry.signing import key_for
    from mlops_ray.storage import from_cfg
    return key_for(db_url(job.db.plain(), from_cfg(job.storage.plain())))


def evaluation_inputs(job: EvaluateJob, rec: dict[str, Any]) -> dict[str, Any]:
    """Everything a gate report depends on besides the run itself: a stored report is reused
    only when every part is the same (needs_evaluation names the first that is not)."""
    from mlops_ray.runtime import code_version
    from mlops_ray.utils import stable_hash
    code = code_version()
    cv = job.cv.plain()  # how the folds are scheduled (parallel, CPUs) changes no result
    parts = {"threshold": job.threshold.plain(), "fairness": job.fairness.plain(),
             "cv": {k: cv[k] for k in ("folds", "epochs")}, "gates": job.gates.plain(),
             "n_boot": job.n_boot,
             "data_version": rec["dataset"]["version"],
             "code_version": code.get("git_commit") or code.get("package")}
    return {k: stable_hash(v) for k, v in parts.items()}


def run_data(rec: dict[str, Any], run_job: TrainJob, storage: Any,
             prepared: Prepared | None = None) -> Prepared:
    """The run's own dataset, prepared as it was for training (reused when `prepared` is that
    very preparation), and checked to be the data it was trained on."""
    from mlops_ray.data.prepare import prepared_key
    if prepared is None or prepared.key != prepared_key(rec["config"]["dataset"], run_job.seed):
        prepared = prepare(run_job.dataset, run_job.seed, storage=storage)
    if prepared.version != rec["dataset"]["version"]:
        raise DataValidationError(run_job.dataset.name, [
            f"dataset version is {prepared.version} but the run was trained on "
            f"{rec['dataset']['version']}: the data at {run_job.dataset.uri} changed"])
    return prepared


def check_inputs(job: EvaluateJob, rec: dict[str, Any], prepared: Prepared) -> list[str]:
    """Sensitive attributes present, gate metrics known — before any work starts."""
    attrs = job.fairness.attributes or rec["config"]["dataset"]["sensitive"]
    missing = [a for a in attrs if a not in prepared.frame.columns]
    if missing:
        raise DataValidationError(rec["config"]["dataset"]["name"], [
            f"sensitive attribute(s) {missing} not in the dataset (columns: "
            f"{list(prepared.frame.columns)})"])
    return list(attrs)


def _folds(job: EvaluateJob, run_job: TrainJob, prepared: Prepared, run_store: Any,
           log: Any, folds: list[tuple[Any, Any]], ahead: Any = None) -> list[dict[str, Any]]:
    """Cross-validation, each finished fold stored under <run>/eval/cv/ and reused on rerun
    by an evaluation that would compute exactly the same fold (`ahead`: train/folds.py)."""
    from mlops_ray.train.folds import train_folds
    cvc = job.cv
    if cvc.parallel:
        from mlops_ray.runtime import ensure_ray
        ensure_ray(job.ray.plain())
    tag = (f"k{cvc.folds}-e{cvc.epochs or run_job.train.epochs}-s{run_job.seed}-"
           f"{prepared.version[:8]}")

    def name(i: int) -> str:
        return f"fold_{i}-{tag}.json"
    from mlops_ray.registry.signing import sign, verified
    key = signing_key(job)
    stored = {i: run_store.read_json("eval", "cv", name(i)) for i in range(cvc.folds)
              if run_store.exists("eval", "cv", name(i))}
    # a fold result is reused only if an evaluation holding the registry key wrote it
    results = {i: {k: v for k, v in r.items() if k != "signature"}
               for i, r in stored.items() if verified(r, key)}
    if len(results) < len(stored):
        log(f"cross-validation: {len(stored) - len(results)} stored fold(s) not signed with "
            "the registry key: trained again")
    todo = [i for i in range(cvc.folds) if i not in results]
    if todo:
        log(f"cross-validation: {len(todo)} of {cvc.folds} fold(s) to train"
            + (f" ({cvc.folds - len(todo)} reused)" if len(todo) < cvc.folds else "")
            + (", those started beside the run taken over" if ahead is not None else ""))
    results.update(train_folds(run_job, prepared, folds, todo, parallel=cvc.parallel,
                               max_parallel=cvc.max_parallel, cpus_per_fold=cvc.cpus_per_fold,
                               epochs=cvc.epochs, log=log, ahead=ahead,
                               save=lambda i, r: run_store.write_json(sign(r, key), "eval", "cv",
                                                                      name(i))))
    return [results[i] for i in range(cvc.folds)]


def run_evaluation(job: EvaluateJob, log: Any = print, prepared: Prepared | None = None,
                   after_cv: Callable[[], None] | None = None, ahead: Any = None
                   ) -> dict[str, Any]:
    """Evaluate a run against the gates; writes the report and model card; returns the report.
    `after_cv()` runs once the folds are trained (the rest is this process's work alone);
    `ahead`: folds the pipeline started while the run trained (`FoldsAhead`).

    Every input is checked before any work starts (run exists, data unchanged, sensitive
    attributes present, gate metrics known). `prepared`: the pipeline's data, reused when it
    is the run's own."""
    from mlops_ray.evaluation import card, fairness, stats
    from mlops_ray.evaluation import gates as gmod
    from mlops_ray.evaluation.threshold import choose_threshold
    from mlops_ray.runtime import code_version
    storage_cfg = job.storage.plain()
    rec, run_store = resolve_run(job.run, storage_cfg)
    cfg = rec["config"]
    run_job = TrainJob.stored(cfg)
    prepared = run_data(rec, run_job, job.storage, prepared)
    attrs = check_inputs(job, rec, prepared)
    rules = gmod.expand_rules([r.plain() for r in job.gates.rules], attrs)
    gate_spec = {"rules": rules, "champion": job.gates.champion.plain()}
    gmod.validate_gates(gate_spec, gmod.metric_names(attrs))
    champion_rec = resolve_run(job.champion, storage_cfg)[0] if job.champion else None
    fair_cfg = job.fairness
    mit_attr = fair_cfg.mitigation_attribute or attrs[0]
    if fair_cfg.mitigation != "none" and mit_attr not in attrs:
        raise ConfigError(f"fairness.mitigation_attribute={mit_attr!r}: not among the sensitive "
                          f"attributes {attrs}")

    # 1. cross-validation, and a logistic-regression baseline on the same folds
    from concurrent.futures import ThreadPoolExecutor

    from mlops_ray.evaluation import baseline
    fold_rows = cvmod.fold_indices(prepared, job.cv.folds, run_job.seed)
    with ThreadPoolExecutor(1) as pool:  # with Ray folds, the baseline is fitted meanwhile
        pending = pool.submit(baseline.baseline_folds, prepared, fold_rows, run_job.seed) \
            if job.cv.parallel else None
        folds = _folds(job, run_job, prepared, run_store, log, fold_rows, ahead)
        base = pending.result() if pending else baseline.baseline_folds(prepared, fold_rows,
                                                                         run_job.seed)
    if after_cv:
        after_cv()
    cv_summary = cvmod.summarise(folds)
    cv_summary.update(baseline.compare(folds, base))
    log(f"cross-validation AUC {cv_summary['cv/auc_mean']:.4f} (baseline, logistic "
        f"regression on the same folds: {cv_summary['cv/baseline_auc_mean']:.4f}; difference "
        f"{cv_summary['cv/auc_vs_baseline_mean']:+.4f} [{cv_summary['cv/auc_vs_baseline_ci_low']:+.4f}, "
        f"{cv_summary['cv/auc_vs_baseline_ci_high']:+.4f}])")

    # 2. held-out test at a threshold chosen on validation rows
    val_rows = prepared.frame.iloc[prepared.splits["val"]]
    test_rows = prepared.frame.iloc[prepared.splits["test"]]
    y_val, y_test = prepared.labels(val_rows).astype(int), prepared.labels(test_rows).astype(int)
    candidate = load_run_model(rec, storage_cfg)  # loaded once: val, test and mitigation
    p_val, p_test = candidate(val_rows), candidate(test_rows)
    thr = choose_threshold(y_val, p_val, job.threshold.objective, job.threshold.max_rate_ratio)
    test = binary_metrics(y_test, p_test, thr, prefix="test/")
    test_ci = {"test/auc": stats.bootstrap_ci(stats.roc_auc, y_test, p_test, n=job.n_boot,
                                              strata=y_test)}
    for key, fn in (("test/accuracy", lambda y, p: float(((p >= thr) == y).mean())),
                    ("test/brier", lambda y, p: float(((p - y) ** 2).mean()))):
        test_ci[key] = stats.bootstrap_ci(fn, y_test, p_test, n=job.n_boot, strata=y_test)
    y_pred = (p_test >= thr).astype(int)

    # 3. fairness on test rows, after the configured post-processing mitigation
    # the decision rule the gates judge, and every consumer of the version applies (rule.json)
    from mlops_ray.artifacts import rule as rule_mod
    decision = rule_mod.plain(thr)
    mitigation = None
    if fair_cfg.mitigation == "threshold":
        fitted = fairness.threshold_optimizer(candidate, val_rows, y_val, val_rows[mit_attr],
                                              constraint=fair_cfg.constraint, seed=cfg["seed"])
        decision = rule_mod.from_fairlearn(fitted.optimizer, thr, mit_attr, fair_cfg.constraint)
        y_mit = rule_mod.labels(decision, p_test, test_rows[mit_attr].tolist())
        mitigation = fairness.mitigation_summary(fitted, y_test, y_pred, y_mit,
                                                 test_rows[mit_attr])
        y_pred = y_mit
        # the gates judge the predictor that would be deployed: thresholded metrics from its labels
        from sklearn.metrics import f1_score
        test["test/accuracy"] = float((y_pred == y_test).mean())
        test["test/f1"] = float(f1_score(y_test, y_pred, zero_division=0))
        test_ci["test/accuracy"] = stats.bootstrap_ci(lambda y, q: float((q == y).mean()), y_test,
                                                      y_pred, n=job.n_boot, strata=y_test)
    elif run_job.train.fairness_penalty.kind != "none":
        mitigation = {"name": "fairness_penalty", **run_job.train.fairness_penalty.plain(),
                      "requires_sensitive_at_prediction": False}
    fair = fairness.fairness_report(y_test, y_pred, test_rows[attrs],
                                    min_group_size=fair_cfg.min_group_size,
                                    n_boot=fair_cfg.n_boot, seed=cfg["seed"])

    # 4. champion on the same test rows, paired
    champion = None
    if champion_rec is not None:
        p_champ = load_run_model(champion_rec, storage_cfg)(test_rows)
        champion = gmod.compare_to_champion({"name": "champion", **job.gates.champion.plain()},
                                            y_test, p_test, p_champ, n_boot=job.n_boot,
                                            seed=cfg["seed"])
        champion["run"] = champion_rec["run_uri"]

    # 5. gates -> report
    metrics = {**cv_summary, **test, **fair["metrics"]}
    cis = {**{k: (v["ci_low"], v["ci_high"]) for k, v in test_ci.items()}, **fair["cis"]}
    cis.update({f"cv/{m}_mean": (cv_summary[f"cv/{m}_ci_low"], cv_summary[f"cv/{m}_ci_high"])
                for m in gmod.CV_METRICS})
    gate_spec_run = gate_spec if champion is not None else {"rules": rules}
    results = gmod.evaluate_gates(gate_spec_run, metrics, cis, champion,
                                  fair.get("undefined"))
    groups = {a: {str(k): int(v) for k, v in prepared.frame[a].astype(str).value_counts()
                  .items()} for a in attrs}
    report: dict[str, Any] = {
        "model": {"name": cfg["name"], "run": rec["run_name"],
                  "intended_use": f"binary prediction of '{prepared.label}' on "
                                  f"{cfg['dataset']['name']}-like tabular data; decision support "
                                  "with human review, not automated adverse decisions"},
        "lineage": {"run": rec["run_uri"], "data_version": rec["dataset"]["version"],
                    "config_hash": rec["config_hash"], "code_version": rec["code_version"],
                    "checkpoint_digest": (rec["checkpoints"].get("digest") or {}).get("best"),
                    "evaluated_with": code_version(), "tune": rec.get("tune")},
        "data": {"dataset": cfg["dataset"]["name"], "rows": rec["dataset"]["splits"],
                 "positive_rate": {"all": rec["dataset"]["positive_rate"],
                                   "test": float(y_test.mean())}, "groups": groups},
        "config": {k: cfg[k] for k in ("model", "optim", "train", "scaling", "seed")
                   if k != "optim" or "library" not in cfg["model"]},  # trees have no optim
        "feature_importance": rec.get("feature_importance"),
        "cv": {"k": job.cv.folds, "folds": folds, "summary": cv_summary,
               "baseline": {"model": "logistic regression, same folds and preprocessing",
                            "folds": base}},
        "test": {"metrics": test, "ci": {k: [v["ci_low"], v["ci_high"]]
                                        for k, v in test_ci.items()}},
        "threshold": {"objective": job.threshold.objective, "value": thr,
                      "max_rate_ratio": job.threshold.max_rate_ratio,
                      "chosen_on": "validation rows"},
        "fairness": {k: v for k, v in fair.items() if k != "cis"},
        "mitigation": mitigation, "champion": champion,
        "rule": decision, "rule_sha256": rule_mod.digest(decision),
        "inputs": evaluation_inputs(job, rec),
        "gates": [r.to_dict() for r in results],
        "curves": card.downsample_curves(y_test, p_test),
    }
    report["passed"] = gmod.passed(report)
    with tempfile.TemporaryDirectory() as tmp:
        written = card.write_model_card(report, Path(tmp))
        for path in written.values():
            run_store.write_bytes(Path(path).read_bytes(), "eval", Path(path).name)
    report["model_card"] = run_store.uri_of("eval", "model_card.md")
    from mlops_ray.registry.signing import sign
    # signed: promotion and the registry act only on a verdict computed with the registry key
    report = sign(report, signing_key(job))
    run_store.write_bytes(json.dumps(report, indent=1).encode(), "eval", "gate_report.json")
    report["report_uri"] = run_store.uri_of("eval", "gate_report.json")
    return report


def _rule_key(rules: list[dict[str, Any]]) -> list[tuple]:
    return sorted((r["name"], r["metric"], r["op"], float(r["threshold"]),
                   r.get("compare", r.get("on"))) for r in rules)


def needs_evaluation(report: dict | None, rec: dict, champion_run: str | None,
                     rules: list[dict[str, Any]], key: bytes,
                     inputs: dict[str, Any] | None = None) -> str | None:
    """Why the run's stored gate report cannot be used (None: it can). `inputs`: this job's
    evaluation_inputs."""
    from mlops_ray.registry.signing import verified
    if report is None:
        return "the run has no gate report"
    if inputs is not None:
        stored = report.get("inputs") or {}
        changed = [k for k in inputs if stored.get(k) != inputs[k]]
        if changed:
            return f"it was evaluated with other {', '.join(changed)}"
    if not verified(report, key):
        return ("its gate report is not signed with the registry key (written by something "
                "other than an evaluation holding it)")
    lin = report.get("lineage") or {}
    if lin.get("run") != rec["run_uri"]:
        return "the report belongs to another run"
    if (lin.get("data_version"), lin.get("config_hash"), lin.get("checkpoint_digest")) != (
            rec["dataset"]["version"], rec["config_hash"],
            (rec["checkpoints"].get("digest") or {}).get("best")):
        return "the report judged other data, config or weights than the run's"
    compared = (report.get("champion") or {}).get("run")
    if compared != champion_run:
        return (f"its champion gate compared against {compared or 'nothing'}, production is "
                f"{champion_run or 'unset'}")
    stored = [{**g, "compare": g["on"]} for g in report["gates"] if g["name"] != "champion"]
    if _rule_key(stored) != _rule_key(rules):
        return "it was judged by other gate rules than this job's"
    return None


def stored_report(job: EvaluateJob, rec: dict[str, Any], run_store: Any,
                  champion_run: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The run's gate report if this job can use it as it is, and why not otherwise."""
    report = run_store.read_json("eval", "gate_report.json") \
        if run_store.exists("eval", "gate_report.json") else None
    from mlops_ray.evaluation.gates import expand_rules
    attrs = job.fairness.attributes or rec["config"]["dataset"]["sensitive"]
    why = needs_evaluation(report, rec, champion_run,
                           expand_rules([r.plain() for r in job.gates.rules], attrs),
                           signing_key(job), evaluation_inputs(job, rec))
    if why is None and report is not None:
        report["report_uri"] = run_store.uri_of("eval", "gate_report.json")
        report["model_card"] = run_store.uri_of("eval", "model_card.md")
    return (report if why is None else None), why
