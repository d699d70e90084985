"""Per-feature drift of live inputs against the training reference stored with the version
(no Ray): PSI and the two-sample KS test for numeric columns, chi-squared and Jensen-Shannon
distance for categorical ones, over a rolling window. A feature alerts when both its effect size
(PSI / JS) and its test (p-value) cross the configured thresholds, so neither a tiny but
"significant" shift on many rows nor a large-looking one on a handful of rows raises an alert."""
from __future__ import annotations

from collections import Counter, deque
from typing import Any

import numpy as np

from mlops_ray.data.profile import bin_shares

EPS = 1e-4


def psi(ref_shares: np.ndarray, live_shares: np.ndarray) -> float:
    r, q = np.clip(ref_shares, EPS, None), np.clip(live_shares, EPS, None)
    return float(np.sum((q - r) * np.log(q / r)))


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
        from scipy.spatial.distance import jensenshannon
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
                row["alert"] = row["psi"] > cfg["psi_threshold"] and row["ks_p"] < cfg["p_value"]
            out.append(row)
        for c in self.cat:
            q = snap[c]
            shares = self.ref["categorical"][c]["shares"]
            row = {"feature": c, "kind": "categorical", "n": len(q)}
            if len(q) >= cfg["min_rows"]:
                counts = Counter(q)
                cats = sorted(set(shares) | set(counts))
                live = np.array([counts.get(k, 0) for k in cats], float)
                ref = np.array([shares.get(k, 0.0) for k in cats])
                ref = np.clip(ref, EPS, None) / np.clip(ref, EPS, None).sum()
                row["js"] = float(jensenshannon(ref, live / live.sum(), base=2))
                row["chi2_p"] = float(stats.chisquare(live, ref * live.sum()).pvalue)
                row["alert"] = row["js"] > cfg["js_threshold"] and row["chi2_p"] < cfg["p_value"]
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
