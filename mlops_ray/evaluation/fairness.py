"""Group fairness of thresholded predictions via Fairlearn, with bootstrap CIs; and the
ThresholdOptimizer post-processing mitigation. No Ray.

Rules, so that a number in the report always means the same thing:
- Groups smaller than `min_group_size` are reported with `small: True`, never merged into an
  "other" group: merging would hide exactly the groups a reader should worry about. Their wide
  CIs show how little the data say about them.
- A group with no positive labels has no TPR (and one with no negatives no FPR). Fairlearn would
  report 0 and inflate the equalized-odds difference, so the per-group table shows NaN there
  (`tpr_undefined` / `fpr_undefined` list such groups), the TPR gap of `eo_diff` is taken over
  the groups with positives and the FPR gap over those with negatives. Demographic parity needs
  no labels and covers every group.
- Missing attribute values form their own group, "missing".
- CIs are percentile bootstraps stratified by group, so every group is in every resample; a
  resample in which a group happens to lose all its positives leaves that group out of that
  resample's TPR comparison.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from fairlearn.postprocessing import ThresholdOptimizer
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import accuracy_score, precision_score

from mlops_ray.evaluation.stats import percentile_ci, resample_counts

CONSTRAINTS = ("demographic_parity", "equalized_odds")
SENSITIVE_AT_PREDICTION = (
    "ThresholdOptimizer applies a different threshold per group: the sensitive attribute must be "
    "supplied with every prediction request, and a label is drawn between two thresholds per "
    "group by a number derived from the row's probability (the decision rule, rule.json: the "
    "same request always gets the same label, and Serve, jobs.predict and the gates use it alike)."
)


def group_labels(values: pd.Series | np.ndarray) -> np.ndarray:
    """Attribute values as strings, missing values as their own group "missing"."""
    s = pd.Series(values).astype(object)
    return s.where(s.notna(), "missing").astype(str).to_numpy()


def _range(x: np.ndarray) -> np.ndarray:
    """max - min over groups (last axis), ignoring undefined groups; NaN under two defined."""
    ok = np.isfinite(x)
    lo = np.where(ok, x, np.inf).min(axis=-1)
    hi = np.where(ok, x, -np.inf).max(axis=-1)
    return np.where(ok.sum(axis=-1) >= 2, hi - lo, np.nan)


def _group_rates(w: np.ndarray, onehot: np.ndarray, y: np.ndarray, pred: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selection rate, TPR and FPR per group for each row of weights `w` (b, rows) -> (b, k)."""
    def s(v: np.ndarray) -> np.ndarray:
        return w @ (onehot * v[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = s(pred) / s(np.ones_like(pred))
        tpr = s(y * pred) / s(y)
        fpr = s((1 - y) * pred) / s(1 - y)
    return rate, tpr, fpr


def eo_difference(y: np.ndarray, pred: np.ndarray, g: np.ndarray) -> float:
    """Fairlearn's equalized-odds difference (the larger of the TPR and FPR gaps between groups),
    with the TPR gap taken over groups that have positives and the FPR gap over groups that have
    negatives. When every group has both, this is `equalized_odds_difference` itself."""
    frame = pd.DataFrame({"g": g, "y": y})
    n_pos = frame.groupby("g")["y"].sum()
    n_neg = frame.groupby("g")["y"].count() - n_pos
    if (n_pos > 0).all() and (n_neg > 0).all():
        return float(equalized_odds_difference(y, pred, sensitive_features=g))
    gaps = []
    for metric, ok in ((true_positive_rate, n_pos > 0), (false_positive_rate, n_neg > 0)):
        keep = np.isin(g, ok.index[ok].to_numpy())
        if ok.sum() >= 2:
            gaps.append(MetricFrame(metrics=metric, y_true=y[keep], y_pred=pred[keep],
                                    sensitive_features=g[keep]).difference())
    return float(max(gaps)) if gaps else float("nan")


def _ci_dict(value: float, samples: np.ndarray, level: float) -> dict[str, float]:
    lo, hi = percentile_ci(samples, level)
    return {"value": float(value), "ci_low": lo, "ci_high": hi}


def _attribute(y: np.ndarray, pred: np.ndarray, g: np.ndarray, min_group_size: int,
               n_boot: int, seed: int, level: float) -> dict[str, Any]:
    mf = MetricFrame(
        metrics={"rate": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate,
                 "precision": partial(precision_score, zero_division=0), "count": count},
        y_true=y, y_pred=pred, sensitive_features=g)
    table = mf.by_group
    names = [str(i) for i in table.index]
    onehot = (g[:, None] == np.asarray(names)[None, :]).astype(np.float64)
    positives = onehot.T @ y
    negatives = onehot.sum(axis=0) - positives

    rates, tprs, fprs = [], [], []
    for w in resample_counts(len(y), n_boot, seed, strata=g):
        r, t, f = _group_rates(w, onehot, y, pred)
        rates.append(r)
        tprs.append(t)
        fprs.append(f)
    rate_b, tpr_b, fpr_b = np.vstack(rates), np.vstack(tprs), np.vstack(fprs)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_b = np.nanmin(rate_b, axis=1) / np.nanmax(rate_b, axis=1)
    eo_b = np.fmax(_range(tpr_b), _range(fpr_b))  # groups undefined in a resample drop out

    groups = []
    for k, name in enumerate(names):
        row = table.iloc[k]
        groups.append({
            "group": name, "count": int(row["count"]), "positives": int(positives[k]),
            "rate": float(row["rate"]), "rate_ci": list(percentile_ci(rate_b[:, k], level)),
            "tpr": float(row["tpr"]) if positives[k] else float("nan"),
            "tpr_ci": list(percentile_ci(tpr_b[:, k], level)),
            "fpr": float(row["fpr"]) if negatives[k] else float("nan"),
            "fpr_ci": list(percentile_ci(fpr_b[:, k], level)),
            "precision": float(row["precision"]),
            "small": bool(row["count"] < min_group_size)})

    overall = mf.overall
    return {
        "groups": groups,
        "overall": {"rate": float(overall["rate"]), "tpr": float(overall["tpr"]),
                    "fpr": float(overall["fpr"]), "precision": float(overall["precision"]),
                    "count": int(overall["count"])},
        "dp_diff": _ci_dict(demographic_parity_difference(y, pred, sensitive_features=g),
                            _range(rate_b), level),
        "dp_ratio": _ci_dict(demographic_parity_ratio(y, pred, sensitive_features=g),
                             ratio_b, level),
        "eo_diff": _ci_dict(eo_difference(y, pred, g), eo_b, level),
        "small_groups": [n for n, r in zip(names, groups) if r["small"]],
        "tpr_undefined": [n for n, k in zip(names, positives) if not k],
        "fpr_undefined": [n for n, k in zip(names, negatives) if not k],
    }


def _gated(rep: dict[str, Any], y: np.ndarray, pred: np.ndarray, g: np.ndarray,
           min_group_size: int, n_boot: int, seed: int, level: float) -> dict[str, Any]:
    """The gaps the gates read: over the groups of at least min_group_size rows only (a rate
    from a handful of rows would decide the gate); the small groups stay in the table."""
    small = set(rep["small_groups"])
    if not small:
        return {**rep, "gated_groups": [gr["group"] for gr in rep["groups"]]}
    keep = ~np.isin(g, list(small))
    kept = sorted(set(g[keep].tolist()))
    note = f"gaps over groups of at least the minimum size; not gated: {sorted(small)}"
    if len(kept) < 2:  # no comparison left: no evidence, and a gate on it fails
        nan = {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
        gaps = {"dp_diff": nan, "dp_ratio": nan, "eo_diff": nan}
        sizes = ", ".join(f"{gr['group']} {gr['count']}" for gr in rep["groups"])
        note = (f"no gap to gate: fewer than two groups of at least {min_group_size} test rows "
                f"({sizes}); lower fairness.min_group_size to gate them")
    else:
        sub = _attribute(y[keep], pred[keep], g[keep], 0, n_boot, seed, level)
        gaps = {k: sub[k] for k in ("dp_diff", "dp_ratio", "eo_diff")}
    return {**rep, **gaps, "gated_groups": kept, "note": note}


def fairness_report(y: np.ndarray, y_pred: np.ndarray, sensitive: pd.DataFrame | pd.Series,
                    min_group_size: int = 30, n_boot: int = 200, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """Per sensitive attribute (column of `sensitive`): per-group table, dp_diff, dp_ratio and
    eo_diff with bootstrap CIs. `metrics` holds them flat as `fair/<name>_<attr>` plus
    `_ci_low` / `_ci_high`; `cis` maps the same names to (low, high) for `evaluate_gates`."""
    y = np.asarray(y).astype(int)
    pred = np.asarray(y_pred).astype(int)
    frame = sensitive.to_frame() if isinstance(sensitive, pd.Series) else sensitive
    attributes: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    cis: dict[str, tuple[float, float]] = {}
    undefined: dict[str, str] = {}  # metric -> why it has no value (for the gate's detail)
    for i, attr in enumerate(frame.columns):
        g = group_labels(frame[attr].to_numpy())
        rep = _gated(_attribute(y, pred, g, min_group_size, n_boot, seed + i, level),
                     y, pred, g, min_group_size, n_boot, seed + i, level)
        attributes[str(attr)] = rep
        for name in ("dp_diff", "dp_ratio", "eo_diff"):
            key, r = f"fair/{name}_{attr}", rep[name]
            metrics.update({key: r["value"], f"{key}_ci_low": r["ci_low"],
                            f"{key}_ci_high": r["ci_high"]})
            cis[key] = (r["ci_low"], r["ci_high"])
            if not np.isfinite(r["value"]) and rep.get("note"):
                undefined[key] = f"{attr}: {rep['note']}"
    return {"attributes": attributes, "metrics": metrics, "cis": cis, "undefined": undefined,
            "min_group_size": min_group_size, "n_boot": n_boot, "level": level}


class ProbaClassifier(ClassifierMixin, BaseEstimator):
    """The sklearn face of a probability function (rows -> P(y=1)), so that Fairlearn can call
    `predict_proba` on a model it did not train."""

    def __init__(self, proba_fn: Callable[[Any], np.ndarray]):
        self.proba_fn = proba_fn

    def fit(self, X: Any = None, y: Any = None) -> ProbaClassifier:
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        p = np.asarray(self.proba_fn(X), dtype=np.float64).reshape(-1)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)


@dataclass
class FairThreshold:
    """A fitted ThresholdOptimizer with its prediction seed. The sensitive attribute is needed at
    prediction time (see `SENSITIVE_AT_PREDICTION`)."""

    optimizer: ThresholdOptimizer
    attribute: str
    constraint: str
    seed: int = 0
    requires_sensitive_at_prediction: bool = True

    def predict(self, X: Any, sensitive_features: Any) -> np.ndarray:
        return np.asarray(self.optimizer.predict(X, sensitive_features=group_labels(
            sensitive_features), random_state=self.seed)).astype(int)


def threshold_optimizer(proba_fn: Callable[[Any], np.ndarray], X_val: Any, y_val: np.ndarray,
                        sensitive_val: pd.Series, constraint: str = "equalized_odds",
                        objective: str = "accuracy_score", grid_size: int = 1000,
                        seed: int = 0) -> FairThreshold:
    """Fit Fairlearn's ThresholdOptimizer (prefit, on predict_proba) on validation rows around
    the already-trained model `proba_fn`; group thresholds are chosen on validation, never test."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; allowed: {', '.join(CONSTRAINTS)}")
    opt = ThresholdOptimizer(estimator=ProbaClassifier(proba_fn).fit(), constraints=constraint,
                             objective=objective, grid_size=grid_size, prefit=True,
                             predict_method="predict_proba")
    opt.fit(X_val, np.asarray(y_val).astype(int), sensitive_features=group_labels(sensitive_val))
    return FairThreshold(opt, str(getattr(sensitive_val, "name", None) or "sensitive"),
                         constraint, seed)


def _summary(y: np.ndarray, pred: np.ndarray, g: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(y, pred)), "selection_rate": float(pred.mean()),
            "dp_diff": float(demographic_parity_difference(y, pred, sensitive_features=g)),
            "eo_diff": eo_difference(y, pred, g)}


def mitigation_summary(fitted: FairThreshold, y: np.ndarray, y_pred_before: np.ndarray,
                       y_pred_after: np.ndarray, sensitive: pd.Series) -> dict[str, Any]:
    """The report's `mitigation` section: accuracy and disparities before and after, on the
    same (test) rows, and the prediction-time requirement stated explicitly."""
    y, g = np.asarray(y).astype(int), group_labels(sensitive)
    return {"name": "threshold_optimizer", "constraint": fitted.constraint,
            "attribute": fitted.attribute, "fitted_on": "validation rows",
            "requires_sensitive_at_prediction": True, "note": SENSITIVE_AT_PREDICTION,
            "before": _summary(y, np.asarray(y_pred_before).astype(int), g),
            "after": _summary(y, np.asarray(y_pred_after).astype(int), g)}
