"""A reference profile of training rows, stored with every registry version: what live traffic
and batch inputs are compared against for drift (no Ray). Numeric columns keep decile bin edges
with the training share per bin (for PSI) and a fixed-size sample (for KS); categorical columns
keep category shares (for chi-squared / Jensen-Shannon)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def profile(df: pd.DataFrame, numeric: list[str], categorical: list[str], bins: int = 10,
            sample: int = 2000, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": int(len(df)), "numeric": {}, "categorical": {}}
    rng = np.random.default_rng(seed)
    for c in numeric:
        x = pd.to_numeric(df[c], errors="coerce").dropna().to_numpy(np.float64)
        edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1))) if len(x) else np.zeros(0)
        out["numeric"][c] = {
            "edges": edges[1:-1].tolist(),  # inner edges; the outer bins are open-ended
            "shares": bin_shares(x, edges[1:-1]).tolist(),
            "sample": np.sort(rng.choice(x, min(sample, len(x)), replace=False)).tolist(),
            "mean": float(x.mean()) if len(x) else None,
            "missing": float(df[c].isna().mean())}
    for c in categorical:
        shares = df[c].astype("string").fillna("<missing>").value_counts(normalize=True)
        out["categorical"][c] = {"shares": {str(k): float(v) for k, v in shares.items()}}
    return out


def bin_shares(x: np.ndarray, inner_edges: list[float] | np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(np.asarray(inner_edges), x, side="right"),
                         minlength=len(inner_edges) + 1)
    return counts / max(1, counts.sum())
