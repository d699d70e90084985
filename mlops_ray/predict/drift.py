"""Drift of a whole scored batch against the version's training reference, from counts (no Ray).

Each scoring batch is reduced to counts: per numeric feature the rows in each of the reference's
bins (its decile edges), missing values and the sum; per categorical feature the rows of each
training category, `<missing>`, and everything else as `<unseen>`. Counts add up, so the report
covers every row without any worker holding more than one batch. The effect sizes are those of
live serving (`mlops_ray.evaluation.drift`): PSI on the reference bins, Jensen-Shannon distance on
category shares. Serving's KS test needs raw values, so both kinds are tested here with a
chi-squared test of the counts against the reference shares; a feature alerts when its effect
size and its test both cross the `predict.drift` thresholds (same meaning as `serve.drift`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mlops_ray.evaluation.drift import categorical_shift, psi, shares_p, shift_alert

MISSING, UNSEEN = "<missing>", "<unseen>"
EXAMPLES = 10  # unseen category values kept as examples per feature


def drift_columns(reference: dict[str, Any], available: set[str]) -> tuple[list[str], list[str]]:
    """(numeric, categorical) reference features present in the input."""
    return ([c for c in reference["numeric"] if c in available],
            [c for c in reference["categorical"] if c in available])


def _named_alike(col: pd.Series) -> bool:
    """Whether `str(value)` names each value of `col` as `col.astype("string")` does: strings,
    integers and booleans. Not floats or dates (their text differs), nor objects of mixed
    types (Python counts 1, 1.0 and True as one value)."""
    values = col.dtype.categories if isinstance(col.dtype, pd.CategoricalDtype) else col
    if values.dtype == object:
        return pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty")
    return isinstance(values.dtype, pd.StringDtype) or pd.api.types.is_integer_dtype(
        values.dtype) or pd.api.types.is_bool_dtype(values.dtype)


def batch_counts(df: pd.DataFrame, reference: dict[str, Any], numeric: list[str],
                 categorical: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": int(len(df)), "numeric": {}, "categorical": {}}
    for c in numeric:
        x = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64)
        ok = x[~np.isnan(x)]
        edges = np.asarray(reference["numeric"][c]["edges"], np.float64)
        bins = np.bincount(np.searchsorted(edges, ok, side="right"), minlength=len(edges) + 1)
        out["numeric"][c] = {"bins": bins.tolist(), "missing": int(len(x) - len(ok)),
                             "sum": float(ok.sum())}
    for c in categorical:
        known = reference["categorical"][c]["shares"]
        # the raw values counted, then named as `astype("string")` names them (NaN/None/NA:
        # missing): the same counts at a fifth of the cost of converting every row first
        col = df[c] if _named_alike(df[c]) else df[c].astype("string")
        vc = col.value_counts(dropna=False)
        counts: dict[str, int] = {}
        examples: list[str] = []
        for k, n in vc.items():
            if not n:  # a category of a pandas Categorical that no row has
                continue
            key = MISSING if pd.isna(k) else str(k)  # type: ignore[call-overload]
            if key in known or key == MISSING:
                counts[key] = counts.get(key, 0) + int(n)
            else:
                counts[UNSEEN] = counts.get(UNSEEN, 0) + int(n)
                if len(examples) < EXAMPLES and key not in examples:
                    examples.append(key)
        out["categorical"][c] = {"counts": counts, "unseen_examples": examples}
    return out


def merge(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Sum two count sets (either may be None: nothing counted yet)."""
    if a is None or b is None:
        return a if b is None else b
    out: dict[str, Any] = {"rows": a["rows"] + b["rows"], "numeric": {}, "categorical": {}}
    for c in a["numeric"].keys() | b["numeric"].keys():
        x, y = a["numeric"].get(c), b["numeric"].get(c)
        out["numeric"][c] = x if y is None else y if x is None else {
            "bins": [i + j for i, j in zip(x["bins"], y["bins"])],
            "missing": x["missing"] + y["missing"], "sum": x["sum"] + y["sum"]}
    for c in a["categorical"].keys() | b["categorical"].keys():
        x, y = a["categorical"].get(c), b["categorical"].get(c)
        if x is None or y is None:
            out["categorical"][c] = x if y is None else y
            continue
        counts = dict(x["counts"])
        for k, n in y["counts"].items():
            counts[k] = counts.get(k, 0) + n
        ex = x["unseen_examples"] + [e for e in y["unseen_examples"]
                                     if e not in x["unseen_examples"]]
        out["categorical"][c] = {"counts": counts, "unseen_examples": ex[:EXAMPLES]}
    return out


def drift_table(counts: dict[str, Any] | None, reference: dict[str, Any],
                cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per reference feature, in the shape of serving's drift table (format_table):
    numeric rows carry `psi`, categorical rows `js`, both `chi2_p` and `alert`; `n` counts the
    non-missing values. Features absent from the input are listed with `absent: true`."""
    counts = counts or {"numeric": {}, "categorical": {}}
    rows: list[dict[str, Any]] = []
    for c, ref in reference["numeric"].items():
        got = counts["numeric"].get(c)
        if got is None:
            rows.append({"feature": c, "kind": "numeric", "n": 0, "absent": True})
            continue
        live = np.asarray(got["bins"], np.float64)
        n = int(live.sum())
        row: dict[str, Any] = {"feature": c, "kind": "numeric", "n": n,
                               "missing": got["missing"], "ref_mean": ref["mean"]}
        if n:
            shares = np.asarray(ref["shares"], np.float64)
            row["psi"] = psi(shares, live / n)
            row["chi2_p"] = shares_p(live, shares)
            row["live_mean"] = got["sum"] / n
            row["alert"] = shift_alert(row["psi"], cfg["psi_threshold"], row["chi2_p"],
                                       cfg["p_value"])
        rows.append(row)
    for c, ref in reference["categorical"].items():
        got = counts["categorical"].get(c)
        if got is None:
            rows.append({"feature": c, "kind": "categorical", "n": 0, "absent": True})
            continue
        n = sum(got["counts"].values())
        row = {"feature": c, "kind": "categorical", "n": n,
               "unseen": got["counts"].get(UNSEEN, 0),
               "unseen_examples": got["unseen_examples"]}
        if n:
            row["js"], row["chi2_p"] = categorical_shift(ref["shares"], got["counts"])
            row["alert"] = shift_alert(row["js"], cfg["js_threshold"], row["chi2_p"],
                                       cfg["p_value"])
        rows.append(row)
    return rows
