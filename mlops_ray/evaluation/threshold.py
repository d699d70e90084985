"""Decision threshold chosen on validation rows (never on test rows), no Ray."""
from __future__ import annotations

import numpy as np

OBJECTIVES = ("f1", "youden", "accuracy")


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, objective: str = "f1",
                     max_rate_ratio: float | None = None) -> float:
    """The validation score t maximising `objective` for the rule "positive when p >= t".

    Candidates are the distinct validation scores (every achievable split), evaluated at once from
    cumulative counts. Ties go to the highest threshold, the fewest positive predictions.
    objective: "f1", "youden" (TPR - FPR) or "accuracy". `max_rate_ratio`: only thresholds
    whose predicted-positive rate is within [base rate / r, base rate * r] (F1 alone may
    predict most rows positive on balanced data: 83% at a 45% base rate, accuracy 0.54); when
    none is, the unconstrained best.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown threshold objective {objective!r}; "
                         f"allowed: {', '.join(OBJECTIVES)}")
    y = np.asarray(y_val).astype(int)
    p = np.asarray(p_val, dtype=np.float64)
    t, inv = np.unique(p, return_inverse=True)           # ascending distinct scores
    pos_at = np.bincount(inv, weights=y, minlength=len(t))
    neg_at = np.bincount(inv, weights=1 - y, minlength=len(t))
    tp = np.cumsum(pos_at[::-1])[::-1]                   # positives with p >= t[k]
    fp = np.cumsum(neg_at[::-1])[::-1]
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    fn, tn = n_pos - tp, n_neg - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        if objective == "f1":
            score = 2 * tp / (2 * tp + fp + fn)
        elif objective == "youden":
            score = tp / n_pos - fp / n_neg
        else:
            score = (tp + tn) / len(y)
    score = np.nan_to_num(score, nan=-np.inf)
    if max_rate_ratio and 0 < n_pos < len(y):
        base, rate = n_pos / len(y), (tp + fp) / len(y)
        ok = (rate >= base / max_rate_ratio) & (rate <= base * max_rate_ratio)
        if ok.any():
            score = np.where(ok, score, -np.inf)
    return float(t[len(t) - 1 - np.argmax(score[::-1])])
