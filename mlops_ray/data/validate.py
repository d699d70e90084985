"""Check a table against its declared schema and report every violation at once."""
from __future__ import annotations

from typing import Any

import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from mlops_ray.errors import DataValidationError


def validate_frame(df: pd.DataFrame, cfg: dict[str, Any]) -> None:
    """`cfg` is the `dataset` section as a plain dict. Raises DataValidationError."""
    name, label = cfg["name"], cfg["label"]
    v: list[str] = []
    needed = [label, *cfg["numeric"], *cfg["categorical"], *cfg["sensitive"]]
    if cfg.get("split", {}).get("column"):
        needed.append(cfg["split"]["column"])
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        v.append(f"missing column(s) {missing} (present: {list(df.columns)})")
    if len(df) < cfg.get("min_rows", 1):
        v.append(f"{len(df)} rows, fewer than dataset.min_rows={cfg['min_rows']}")
    if label in df.columns:
        y = df[label]
        if y.isna().any():
            v.append(f"label '{label}': {int(y.isna().sum())} missing value(s)")
        values = sorted(map(str, y.dropna().unique()))
        if len(values) != 2:
            v.append(f"label '{label}' must be binary, found {len(values)} value(s): {values[:10]}")
        elif str(cfg.get("positive", 1)) not in values:
            v.append(f"label '{label}': positive value {cfg.get('positive', 1)!r} not among "
                     f"{values}")
    checks = cfg.get("checks", {})
    for c in cfg["numeric"]:
        if c in df.columns and not (is_numeric_dtype(df[c]) and not is_bool_dtype(df[c])):
            v.append(f"column '{c}': declared numeric but has dtype {df[c].dtype}")
    for c in dict.fromkeys(cfg["numeric"] + cfg["categorical"] + cfg["sensitive"]):
        if c not in df.columns:
            continue
        col, chk = df[c], checks.get(c) or {}
        limit = chk.get("max_missing")
        limit = cfg.get("max_missing", 0.1) if limit is None else limit
        if c in cfg["sensitive"]:
            limit = 0.0  # a group must be known for every row that is evaluated for fairness
        frac = float(col.isna().mean())
        if frac > limit:
            v.append(f"column '{c}': {frac:.1%} missing, above the limit {limit:.1%}")
        if chk.get("min") is not None and is_numeric_dtype(col) and (col < chk["min"]).any():
            v.append(f"column '{c}': {int((col < chk['min']).sum())} value(s) below min="
                     f"{chk['min']} (smallest {col.min()})")
        if chk.get("max") is not None and is_numeric_dtype(col) and (col > chk["max"]).any():
            v.append(f"column '{c}': {int((col > chk['max']).sum())} value(s) above max="
                     f"{chk['max']} (largest {col.max()})")
        if chk.get("categories") is not None:
            bad = sorted(set(map(str, col.dropna().unique())) - set(map(str, chk["categories"])))
            if bad:
                v.append(f"column '{c}': unexpected categories {bad[:10]} (allowed: "
                         f"{chk['categories']})")
    if v:
        raise DataValidationError(name, v)
