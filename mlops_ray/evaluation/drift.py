"""Per-feature drift of live inputs against the training reference stored with the version
(no Ray): PSI and the two-sample KS test for numeric columns, chi-squared and Jensen-Shannon
distance for categorical ones, over a rolling window. A feature alerts when both its effect size
(PSI / JS) and its test (p-value) cross the configured thresholds, so neither a tiny but
"significant" shift on many rows nor a large-looking one on a handful of rows raises an alert."""
from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any

import numpy as np

from mlops_ray.data.profile import bin_shares

EPS = 1e-4


def psi(ref_shares: np.ndarray, live_shares: np.ndarray) -> float:
    r, q = np.clip(ref_shares, EPS, None), np.clip(live_shares, EPS, None)
    return float(np.sum((q - r) * np.log(q / r)))


# The three below give what SciPy's `stats.chisquare(...).pvalue` and
# `spatial.distance.jensenshannon` give, without SciPy: importing it costs a job's driver (which
# only adds up the workers' counts) ~0.5 s on a 2-core machine. tests/unit/test_evaluation.py
# compares them with SciPy's.
def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X chi-squared with integer `df` >= 1: the regularized upper incomplete gamma
    Q(df/2, x/2) in its closed forms for whole and half-whole shapes, summed in log space."""
    if df < 1 or math.isnan(x):
        return math.nan
    if x == math.inf:
        return 0.0
    if x <= 0:
        return 1.0
    h = x / 2
    if df % 2 == 0:  # Q(m, h) = exp(-h) sum_{j<m} h^j / j!
        logs = [j * math.log(h) - math.lgamma(j + 1) for j in range(df // 2)]
        return min(1.0, math.exp(_logsumexp(logs) - h))
    # Q(m + 1/2, h) = erfc(sqrt(h)) + exp(-h) sum_{j=1..m} h^(j - 1/2) / Gamma(j + 1/2)
    logs = [(j - 0.5) * math.log(h) - math.lgamma(j + 0.5) for j in range(1, df // 2 + 1)]
    tail = math.exp(_logsumexp(logs) - h) if logs else 0.0
    return min(1.0, math.erfc(math.sqrt(h)) + tail)


def _logsumexp(logs: list[float]) -> float:
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs))


def chi2_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-squared p-value of `observed` counts against `expected` counts (same sum),
    len - 1 degrees of freedom."""
    f_obs, f_exp = np.asarray(observed, np.float64), np.asarray(expected, np.float64)
    return chi2_sf(float(np.sum((f_obs - f_exp) ** 2 / f_exp)), len(f_obs) - 1)


def _clipped(shares: Any) -> np.ndarray:
    """Shares clipped at EPS (a cell never seen in training keeps a finite expectation) and
    renormalised."""
    ref = np.clip(np.asarray(shares, np.float64), EPS, None)
    return ref / ref.sum()


def _p(live: np.ndarray, ref: np.ndarray) -> float | None:
    """`chi2_p` of live counts against clipped shares; None with fewer than 2 cells (e.g. a
    column constant in training: no test) or no finite value."""
    if len(live) < 2:
        return None
    p = chi2_p(live, ref * np.sum(live))
    return p if math.isfinite(p) else None


def shares_p(live: np.ndarray, ref_shares: np.ndarray) -> float | None:
    """`chi2_p` of live counts against reference shares (clipped at EPS, renormalised), or
    None (see `_p`)."""
    return _p(live, _clipped(ref_shares))


def categorical_shift(shares: dict[str, float], counts: dict[str, int]
                      ) -> tuple[float, float | None]:
    """(JS distance, chi-squared p-value or None) of live category counts against the
    reference's category shares, over the categories of either (serving's window, a batch
    job's summed counts)."""
    cats = sorted(set(shares) | set(counts))
    live = np.array([counts.get(k, 0) for k in cats], np.float64)
    ref = _clipped([shares.get(k, 0.0) for k in cats])
    return js_distance(ref, live / live.sum()), _p(live, ref)


def shift_alert(shift: float, threshold: float, p: float | None, p_value: float) -> bool:
    """A feature alerts when its shift (PSI, JS distance) is over the threshold and its test
    says so too (a p-value below p_value; no test, no alert)."""
    return bool(shift > threshold and p is not None and p < p_value)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two share vectors (normalised here)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    p, q = p / np.sum(p), q / np.sum(q)
    m = (p + q) / 2.0
    return float(np.sqrt((_rel_entr(p, m) + _rel_entr(q, m)) / np.log(2) / 2.0))


def _rel_entr(x: np.ndarray, y: np.ndarray) -> float:
    """sum of scipy.special.rel_entr(x, y) for shares (x = 0 adds 0; here y > 0 where x > 0)."""
    ok = x > 0
    return float(np.sum(x[ok] * np.log(x[ok] / y[ok])))


class DriftMonitor:
    def __init__(self, reference: dict[str, Any], cfg: dict[str, Any]):
        self.ref, self.cfg = reference, cfg
        w = int(cfg["window"])
        self.num: dict[str, deque[Any]] = {c: deque(maxlen=w) for c in reference["numeric"]}
        self.cat: dict[str, deque[Any]] = {c: deque(maxlen=w) for c in reference["categorical"]}
        self.added = 0  # rows seen in total (the window keeps the latest)

    def add(self, records: list[dict[str, Any]]) -> None:
        self.added += len(records)
        for r in records:
            for c, q in self.num.items():
                v = r.get(c)
                if v is not None and v == v:  # NaN != NaN: missing
                    q.append(float(v))
            for c, q in self.cat.items():
                v = r.get(c)
                q.append("<missing>" if v is None or v != v else str(v))

    def snapshot(self) -> dict[str, list]:
        """A copy of the windows (cheap), so `table` can run in another thread while requests
        keep appending."""
        return {c: list(q) for c, q in (*self.num.items(), *self.cat.items())}

    def table(self, snap: dict[str, list] | None = None) -> list[dict[str, Any]]:
        # SciPy here, not at the top: only the process that builds the table pays its import
        # (~0.5 s), not every scoring actor, read or write task that imports this module
        from scipy import stats
        cfg, out = self.cfg, []
        snap = snap if snap is not None else self.snapshot()
        for c in self.num:
            q = snap[c]
            ref = self.ref["numeric"][c]
            row: dict[str, Any] = {"feature": c, "kind": "numeric", "n": len(q)}
            if len(q) >= cfg["min_rows"]:
                x = np.fromiter(q, float)
                row["psi"] = psi(np.asarray(ref["shares"]), bin_shares(x, ref["edges"]))
                row["ks_p"] = float(stats.ks_2samp(x, np.asarray(ref["sample"])).pvalue)
                row["live_mean"], row["ref_mean"] = float(x.mean()), ref["mean"]
                row["alert"] = shift_alert(row["psi"], cfg["psi_threshold"], row["ks_p"],
                                           cfg["p_value"])
            out.append(row)
        for c in self.cat:
            q = snap[c]
            shares = self.ref["categorical"][c]["shares"]
            row = {"feature": c, "kind": "categorical", "n": len(q)}
            if len(q) >= cfg["min_rows"]:
                row["js"], row["chi2_p"] = categorical_shift(shares, Counter(q))
                row["alert"] = shift_alert(row["js"], cfg["js_threshold"], row["chi2_p"],
                                           cfg["p_value"])
            out.append(row)
        return out

    def alerts(self) -> list[str]:
        return [r["feature"] for r in self.table() if r.get("alert")]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'feature':<16} {'kind':<11} {'n':>5} {'PSI/JS':>8} {'p':>9}  alert"
    lines = [head, "-" * len(head)]
    for r in rows:
        eff = r.get("psi", r.get("js"))
        p = r.get("ks_p", r.get("chi2_p"))
        lines.append(f"{r['feature']:<16} {r['kind']:<11} {r['n']:>5} "
                     f"{'-' if eff is None else f'{eff:.3f}':>8} {'-' if p is None else f'{p:.2g}':>9}"
                     f"  {'ALERT' if r.get('alert') else ''}")
    return "\n".join(lines)
