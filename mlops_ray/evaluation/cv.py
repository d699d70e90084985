"""Stratified k-fold cross-validation: which rows make each fold (stratified on label x
sensitive group), and what the folds' scores add up to. Each fold is a full retrain; training
it is train/folds.py's (Ray), judging it is this package's (no Ray)."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from mlops_ray.data import Prepared
from mlops_ray.data.prepare import joined


def fold_indices(prepared: Prepared, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, held-out) position arrays over the non-test rows, stratified on label x
    sensitive group (coarser when a stratum is smaller than k), so small groups are in every fold."""
    rows = np.sort(np.concatenate([prepared.splits["train"], prepared.splits["val"]]))
    df = prepared.frame.iloc[rows]
    cols = [prepared.label, *[c for c in prepared.sensitive if c in df.columns]]
    key = None
    for n in range(len(cols), 0, -1):
        cand = joined(df, cols[:n])
        if cand.value_counts().min() >= k:
            key = cand.to_numpy()
            break
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    strat = key if key is not None else df[prepared.label].astype(str).to_numpy()
    return [(rows[a], rows[b]) for a, b in skf.split(rows, strat)]


def summarise(folds: list[dict[str, Any]], keys: tuple[str, ...] = ("auc", "pr_auc", "accuracy",
                                                                    "log_loss", "brier")
              ) -> dict[str, float]:
    """cv/<metric>_mean, _std and the t-interval of the mean over the folds."""
    from mlops_ray.evaluation.stats import mean_std_ci
    out: dict[str, float] = {}
    for key in keys:
        r = mean_std_ci([f[key] for f in folds])
        out.update({f"cv/{key}_mean": r["mean"], f"cv/{key}_std": r["std"],
                    f"cv/{key}_ci_low": r["ci_low"], f"cv/{key}_ci_high": r["ci_high"]})
    return out
