"""The promotion gates judged on live, labelled traffic (no Ray): the same metric functions,
bootstrap CIs, fairness report and gate evaluation as `jobs.evaluate`, on the served answers
(their probabilities and the labels the decision rule gave) against the outcomes that came
back. Gates on cross-validation or on the champion need a training run: they are listed as not
applicable, never counted as passed."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mlops_ray.evaluation import fairness, stats
from mlops_ray.evaluation import gates as gmod
from mlops_ray.evaluation.metrics import binary_metrics


def live_report(y: np.ndarray, p: np.ndarray, y_pred: np.ndarray, groups: pd.DataFrame,
                rules: Sequence[Mapping[str, Any]], threshold: float, min_group_size: int,
                n_boot: int, seed: int) -> dict[str, Any]:
    """Gate results on labelled traffic. `groups`: the logged sensitive attributes (columns
    missing from the log make their fairness gates not applicable); `rules`: expanded gate
    rules (`expand_rules`)."""
    y, p, y_pred = (np.asarray(a) for a in (y, p, y_pred))
    y = y.astype(int)
    metrics = binary_metrics(y, p, threshold, prefix="test/")
    # thresholded metrics from the labels clients got (a fairness post-processor included)
    metrics["test/accuracy"] = float((y_pred == y).mean())
    tp = float(((y_pred == 1) & (y == 1)).sum())
    denom = float((y_pred == 1).sum() + (y == 1).sum())
    metrics["test/f1"] = 2 * tp / denom if denom else 0.0
    boot: dict[str, dict[str, float]] = {}
    strata = y if len(np.unique(y)) == 2 else None
    if strata is not None:
        boot["test/auc"] = stats.bootstrap_ci(stats.roc_auc, y, p, n=n_boot, strata=strata)
    boot["test/accuracy"] = stats.bootstrap_ci(lambda a, b: float((a == b).mean()), y, y_pred,
                                               n=n_boot, strata=strata)
    boot["test/brier"] = stats.bootstrap_ci(lambda a, b: float(((b - a) ** 2).mean()), y, p,
                                            n=n_boot, strata=strata)
    cis = {k: (v["ci_low"], v["ci_high"]) for k, v in boot.items()}
    undefined: dict[str, str] = {}
    attrs = [c for c in groups.columns if groups[c].notna().any()]
    if attrs:
        fair = fairness.fairness_report(y, y_pred, groups[attrs].reset_index(drop=True),
                                        min_group_size=min_group_size, n_boot=n_boot, seed=seed)
        metrics.update(fair["metrics"])
        cis.update(fair["cis"])
        undefined.update(fair["undefined"])
    applicable, skipped = [], []
    for r in rules:
        m = r["metric"]
        if m.startswith("cv/"):
            skipped.append({"name": r["name"], "why": "cross-validation needs a training run"})
        elif m.startswith("fair/") and not any(m.endswith(f"_{a}") for a in attrs):
            skipped.append({"name": r["name"], "why": "its sensitive attribute is not in the "
                                                      "log (serve.prediction_log.log_sensitive)"})
        else:
            applicable.append(r)
    results = gmod.evaluate_gates({"rules": applicable}, metrics, cis, undefined=undefined) \
        if applicable else []
    return {"rows": int(len(y)), "positive_rate": float(y.mean()) if len(y) else None,
            "metrics": metrics, "gates": [g.to_dict() for g in results],
            "not_applicable": skipped,
            "failed": [g.name for g in results if not g.passed]}
