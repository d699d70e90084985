"""A baseline on the same CV folds: logistic regression on the same preprocessing, so a gate can
ask "is the candidate at least as good as a two-line model?" instead of an absolute threshold
tuned to one dataset (conf/gates/baseline.yaml). No Ray: seconds on the driver."""
from __future__ import annotations

from typing import Any

import numpy as np

from mlops_ray.evaluation.stats import mean_std_ci


def baseline_folds(prepared: Any, folds: list[tuple[np.ndarray, np.ndarray]], seed: int
                   ) -> list[dict[str, float]]:
    """Per fold: the held-out AUC of a logistic regression fitted on the fold's training rows
    (its own preprocessing, fitted on those rows too)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from mlops_ray.data import Preprocessor
    out = []
    pre0 = prepared.preprocessor
    for train_rows, held_rows in folds:
        tr, held = prepared.frame.iloc[train_rows], prepared.frame.iloc[held_rows]
        pre = Preprocessor.fit(tr, pre0.numeric, pre0.categorical)
        lr = LogisticRegression(max_iter=2000, random_state=seed)
        lr.fit(pre.transform(tr), prepared.labels(tr).astype(int))
        p = lr.predict_proba(pre.transform(held))[:, 1]
        out.append({"auc": float(roc_auc_score(prepared.labels(held).astype(int), p))})
    return out


def compare(folds: list[dict[str, Any]], base: list[dict[str, float]]) -> dict[str, float]:
    """cv/baseline_auc_* and the paired per-fold difference cv/auc_vs_baseline_* (candidate
    minus baseline, same folds): its t-interval says whether the candidate is worse."""
    b = mean_std_ci([f["auc"] for f in base])
    d = mean_std_ci([c["auc"] - f["auc"] for c, f in zip(folds, base)])
    return {"cv/baseline_auc_mean": b["mean"], "cv/baseline_auc_std": b["std"],
            "cv/baseline_auc_ci_low": b["ci_low"], "cv/baseline_auc_ci_high": b["ci_high"],
            "cv/auc_vs_baseline_mean": d["mean"], "cv/auc_vs_baseline_std": d["std"],
            "cv/auc_vs_baseline_ci_low": d["ci_low"], "cv/auc_vs_baseline_ci_high": d["ci_high"]}
