"""Uncertainty for evaluation numbers (no Ray): t-intervals over CV folds, percentile bootstrap
over rows, paired candidate-vs-champion comparisons (bootstrap and DeLong).

Every function returns plain floats in a dict with `ci_low` / `ci_high`, so results go straight
into the JSON gate report. Bootstraps are deterministic for a given `seed`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

_CHUNK = 128  # resamples materialised at once: bounds memory at _CHUNK x rows


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC; `paired_bootstrap_delta`'s default metric, for which it has a vectorised path."""
    # scikit-learn and SciPy are imported where used: training workers import this module for
    # weighted_auc alone, and their imports (~1 s) would delay every run's first epoch
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, p))


def mean_std_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample std (ddof=1) and Student-t interval of the mean, for k CV folds.

    With fewer than two finite values the spread is unknown: std and the interval are NaN (a gate
    on them then fails rather than passing on no evidence)."""
    from scipy import stats as sps
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "n": n}
    std = float(v.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * std / np.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": float(mean - half), "ci_high": float(mean + half),
            "n": n}


def _strata_rows(n_rows: int, strata: np.ndarray | None) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n_rows)]
    _, inv = np.unique(np.asarray(strata).astype(str), return_inverse=True)
    return [np.flatnonzero(inv == s) for s in range(inv.max() + 1)]


def resample_indices(n_rows: int, n: int, seed: int = 0, strata: np.ndarray | None = None
                     ) -> Iterator[np.ndarray]:
    """Yield (chunk, n_rows) row-index matrices, `n` resamples in all. With `strata`, each stratum
    is resampled within itself, so every stratum keeps its size in every resample."""
    rng = np.random.default_rng(seed)
    groups = _strata_rows(n_rows, strata)
    for start in range(0, n, _CHUNK):
        b = min(_CHUNK, n - start)
        yield np.concatenate([g[rng.integers(0, len(g), size=(b, len(g)))] for g in groups],
                             axis=1)


def resample_counts(n_rows: int, n: int, seed: int = 0, strata: np.ndarray | None = None
                    ) -> Iterator[np.ndarray]:
    """Like `resample_indices`, but yields (chunk, n_rows) multiplicity matrices: how often each
    row is drawn. Statistics that are sums over rows become matrix products on these."""
    rng = np.random.default_rng(seed)
    groups = _strata_rows(n_rows, strata)
    for start in range(0, n, _CHUNK):
        b = min(_CHUNK, n - start)
        w = np.zeros((b, n_rows))
        for g in groups:
            w[:, g] = rng.multinomial(len(g), np.full(len(g), 1.0 / len(g)), size=b)
        yield w


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval ignoring NaN resamples (where the statistic is undefined)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def bootstrap_ci(fn: Callable[..., float], *arrays: np.ndarray, n: int = 1000,
                 level: float = 0.95, seed: int = 0, strata: np.ndarray | None = None
                 ) -> dict[str, float]:
    """Percentile bootstrap of `fn(*arrays)` resampling rows (the same rows in every array).

    Pass `strata` (e.g. the labels for AUC, the group for a per-group rate) so that every resample
    contains each stratum; a resample where `fn` raises ValueError counts as undefined (NaN)."""
    arrays = tuple(np.asarray(a) for a in arrays)
    rows = len(arrays[0])
    stats: list[float] = []
    # roc_auc of 0/1 labels: the same resamples as multiplicities, one sort for all of them
    labels01 = arrays[0].astype(int) if fn is roc_auc and set(
        np.unique(arrays[0]).tolist()) <= {0, 1} else None
    for chunk in resample_indices(rows, n, seed, strata):
        if labels01 is not None:
            for part in np.array_split(chunk, max(1, len(chunk) // 16)):  # bounds memory
                b = len(part)
                flat = (part + rows * np.arange(b)[:, None]).ravel()
                w = np.bincount(flat, minlength=b * rows).reshape(b, rows).astype(np.float64)
                stats.extend(weighted_auc(labels01, arrays[1], w).tolist())
            continue
        for idx in chunk:
            try:
                stats.append(float(fn(*(a[idx] for a in arrays))))
            except ValueError:
                stats.append(float("nan"))
    lo, hi = percentile_ci(np.asarray(stats), level)
    return {"value": float(fn(*arrays)), "ci_low": lo, "ci_high": hi, "n": n}


def weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of the weight matrix `w` (b, rows): the Mann-Whitney statistic with
    row multiplicities, ties counting one half, in O(b * rows) after one sort."""
    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # first index of each tie block
    ws = w[:, order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    neg = np.add.reduceat(ws * ~ys, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def paired_bootstrap_delta(y: np.ndarray, p_candidate: np.ndarray, p_champion: np.ndarray,
                           metric: Callable[[np.ndarray, np.ndarray], float] = roc_auc,
                           n: int = 1000, seed: int = 0, level: float = 0.95,
                           margin: float = 0.0) -> dict[str, Any]:
    """metric(candidate) - metric(champion) on the same resampled rows (paired), stratified by
    label so both classes are in every resample.

    `p_value` is one-sided for "the candidate is worse by more than `margin`": the share of
    resamples where delta >= -margin (add-one smoothed). Small p: significantly worse.
    """
    y = np.asarray(y).astype(int)
    a, b = np.asarray(p_candidate, dtype=np.float64), np.asarray(p_champion, dtype=np.float64)
    if metric is roc_auc:  # one sort, then matrix products over resample multiplicities
        d = np.concatenate([weighted_auc(y, a, w) - weighted_auc(y, b, w)
                            for w in resample_counts(len(y), n, seed, strata=y)])
    else:
        d = np.array([metric(y[i], a[i]) - metric(y[i], b[i])
                      for chunk in resample_indices(len(y), n, seed, strata=y) for i in chunk])
    cand, champ = float(metric(y, a)), float(metric(y, b))
    lo, hi = percentile_ci(d, level)
    p_value = (1 + int(np.sum(d >= -margin))) / (n + 1)
    return {"test": "bootstrap", "candidate": cand, "champion": champ, "delta": cand - champ,
            "ci_low": lo, "ci_high": hi, "se": float(np.nanstd(d, ddof=1)),
            "p_value": float(p_value), "margin": float(margin), "n": n}


def _midrank(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based, ties averaged) along the last axis."""
    from scipy import stats as sps
    return sps.rankdata(x, method="average", axis=-1)


def delong_test(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, margin: float = 0.0,
                level: float = 0.95) -> dict[str, Any]:
    """DeLong's test for two correlated ROC AUCs on the same rows, by Sun & Xu's fast midrank
    algorithm (O(N log N)).

    `p_value` is two-sided for H0: auc_a == auc_b. `p_value_worse` is one-sided for
    H1: auc_a - auc_b < -margin (a is worse by more than `margin`), the champion-gate test.
    """
    from scipy import stats as sps
    y = np.asarray(y).astype(int)
    scores = np.vstack([np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError("DeLong needs at least two rows of each class")
    tx, ty = _midrank(pos), _midrank(neg)
    tz = _midrank(np.hstack([pos, neg]))
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n        # per positive: share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives that outrank it
    s = np.cov(v10) / m + np.cov(v01) / n
    var = float(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    delta = float(aucs[0] - aucs[1])
    if se > 0:
        z, z_worse = delta / se, (delta + margin) / se
    else:  # identical rankings (or perfect separation by both): no variance, no evidence
        z = 0.0 if delta == 0 else float(np.sign(delta) * np.inf)
        z_worse = 0.0 if delta + margin == 0 else float(np.sign(delta + margin) * np.inf)
    half = float(sps.norm.ppf(0.5 + level / 2)) * se
    return {"test": "delong", "auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "delta": delta,
            "se": se, "z": float(z), "p_value": float(2 * sps.norm.sf(abs(z))),
            "p_value_worse": float(sps.norm.cdf(z_worse)), "ci_low": delta - half,
            "ci_high": delta + half, "margin": float(margin)}
