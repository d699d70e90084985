"""The promotion gates as a tuning trial can estimate them, from its own validation rows (no Ray).

Evaluation chooses the decision threshold (and fits the fairness post-processor) on validation
rows and judges on test rows. A trial must not look at test rows, so it repeats that shape
inside its validation rows by cross-fitting: the threshold and post-processor fitted on one
stratified half label the other half, and the other way round; every validation row is then
judged by a rule that never saw it, with the statistics the gates compare: the value, or the
`ci_low` / `ci_high` end of a bootstrap CI. A CI's half-width shrinks as 1/sqrt(rows), so it
is projected onto the evaluation's test rows (`judged_rows`): a gate on `ci_high` is judged on
the CI the evaluation will compute, not on a 5x wider one. Each rule becomes an Optuna
constraint, `<= 0` when the rule holds: `threshold - x` for `>=` / `>`, `x - threshold` for
`<=` / `<`.

What a trial cannot estimate is named, never guessed: a fold's spread (`cv/*_std`) and the
logistic-regression baseline (`cv/baseline_*`, `cv/auc_vs_baseline_*`) need the evaluation's
cross-validation; `cv/<m>_mean` is estimated by the judged half's <m>.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

PREFIX = "constraint/"  # reported metric names: constraint/<rule name>


def _halves(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split
    a, b = train_test_split(np.arange(len(y)), test_size=0.5, random_state=seed, stratify=y)
    return np.sort(a), np.sort(b)


def _estimable(metric: str) -> str | None:
    """The judged-half statistic a gate metric maps to (None: not estimable in a trial)."""
    if metric.startswith(("test/", "fair/")):
        return metric
    if metric.startswith("cv/") and metric.endswith("_mean") and \
            not metric.startswith(("cv/baseline", "cv/auc_vs_baseline")):
        return "test/" + metric[3:-5]
    return None


def estimate(y: np.ndarray, p: np.ndarray, sensitive: pd.DataFrame,
             rules: list[Mapping[str, Any]], *, objective: str = "f1",
             max_rate_ratio: float | None = 1.5, mitigation: str = "threshold",
             constraint: str = "equalized_odds", mitigation_attribute: str | None = None,
             min_group_size: int = 30, n_boot: int = 200, seed: int = 0,
             judged_rows: int | None = None) -> dict[str, Any]:
    """{"constraints": {rule: c}, "values": {rule: compared number}, "not_estimated":
    {rule: why}, "feasible": bool, "binding": the most violated rule or None}.
    `judged_rows`: how many rows the evaluation judges (its test split; None: these rows)."""
    from mlops_ray.artifacts import rule as rule_mod
    from mlops_ray.evaluation import fairness, stats
    from mlops_ray.evaluation.gates import normalise_gates
    from mlops_ray.evaluation.metrics import binary_metrics
    from mlops_ray.evaluation.threshold import choose_threshold
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    attr = mitigation_attribute or (sensitive.columns[0] if len(sensitive.columns) else None)
    thresholds, pred = [], np.zeros(len(y), dtype=int)
    a, b = _halves(y, seed)
    for fit, judge in ((a, b), (b, a)):
        thr = choose_threshold(y[fit], p[fit], objective, max_rate_ratio)
        thresholds.append(thr)
        pred[judge] = p[judge] >= thr
        if mitigation == "threshold" and attr is not None:
            fitted = fairness.threshold_optimizer(
                lambda x: np.asarray(x)[:, 0], p[fit][:, None], y[fit],
                sensitive[attr].iloc[fit], constraint=constraint, seed=seed)
            decision = rule_mod.from_fairlearn(fitted.optimizer, thr, attr, constraint)
            pred[judge] = rule_mod.labels(decision, p[judge], sensitive[attr].iloc[judge].tolist())
    metrics = {f"test/{k}": v for k, v in binary_metrics(y, p).items()}
    # thresholded metrics from the cross-fitted labels (as the gates judge the deployed rule)
    from sklearn.metrics import f1_score
    metrics.update({"test/accuracy": float((pred == y).mean()),
                    "test/f1": float(f1_score(y, pred, zero_division=0)),
                    "test/threshold": float(np.mean(thresholds))})
    ci = stats.bootstrap_ci(stats.roc_auc, y, p, n=n_boot, seed=seed, strata=y)
    cis = {"test/auc": (ci["ci_low"], ci["ci_high"])}
    fair = fairness.fairness_report(y, pred, sensitive, min_group_size=min_group_size,
                                    n_boot=n_boot, seed=seed)
    metrics.update(fair["metrics"])
    cis.update(fair["cis"])
    shrink = np.sqrt(len(y) / judged_rows) if judged_rows else 1.0

    out: dict[str, Any] = {"constraints": {}, "values": {}, "not_estimated": {},
                           "rows": len(y), "ci_scale": float(shrink)}
    for r in normalise_gates(list(rules)):
        if "max_drop" in r:
            out["not_estimated"][r["name"]] = "the champion gate needs the evaluation's test rows"
            continue
        key = _estimable(r["metric"])
        if key is None:
            out["not_estimated"][r["name"]] = f"{r['metric']} needs the evaluation's CV folds"
            continue
        value = metrics.get(key, float("nan"))
        if r["on"] != "value":
            lo, hi = cis.get(key, (float("nan"), float("nan")))
            value = float(value + ((lo if r["on"] == "ci_low" else hi) - value) * shrink)
        if not np.isfinite(value):
            out["not_estimated"][r["name"]] = f"{key} is undefined on the judged rows"
            continue
        c = float(r["threshold"]) - value if r["op"] in (">=", ">") \
            else value - float(r["threshold"])
        out["constraints"][r["name"]] = float(c)  # plain floats: they go into checkpoints
        out["values"][r["name"]] = float(value)
    worst = max(out["constraints"].items(), key=lambda kv: kv[1], default=None)
    out["feasible"] = all(c <= 0 for c in out["constraints"].values())
    out["binding"] = worst[0] if worst and worst[1] > 0 else None
    return out


def as_metrics(est: Mapping[str, Any]) -> dict[str, float]:
    """What a trial reports: constraint/<rule> per estimated rule, and feasible (0/1)."""
    return {**{PREFIX + k: v for k, v in est["constraints"].items()},
            "feasible": float(est["feasible"])}
