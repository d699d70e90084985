"""Check a table against its declared schema and report every violation at once."""
from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from mlops_ray.errors import DataValidationError

if TYPE_CHECKING:
    from mlops_ray.config.train import DatasetCfg


def validate_frame(df: pd.DataFrame, ds: DatasetCfg) -> None:
    """Every violation of the `dataset` section's declarations at once: DataValidationError."""
    name, label = ds.name, ds.label
    v: list[str] = []
    needed = [label, *ds.numeric, *ds.categorical, *ds.sensitive]
    if ds.split.column:
        needed.append(ds.split.column)
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        import difflib
        hints = [f"'{c}': did you mean '{near[0]}'?" for c in missing
                 if (near := difflib.get_close_matches(c, [str(x) for x in df.columns], n=1))]
        v.append(f"missing column(s) {missing}" + (f" ({'; '.join(hints)})" if hints else "")
                 + f" (present: {list(df.columns)})")
    if len(df) < ds.min_rows:
        v.append(f"{len(df)} rows, fewer than dataset.min_rows={ds.min_rows}")
    if label in df.columns:
        y = df[label]
        if y.isna().any():
            v.append(f"label '{label}': {int(y.isna().sum())} missing value(s)")
        values = sorted(map(str, y.dropna().unique()))
        if len(values) != 2:
            v.append(f"label '{label}' must be binary, found {len(values)} value(s): {values[:10]}")
        elif str(ds.positive) not in values:
            v.append(f"label '{label}': positive value {ds.positive!r} not among {values}")
    for c in ds.numeric:
        if c in df.columns and not (is_numeric_dtype(df[c]) and not is_bool_dtype(df[c])):
            v.append(f"column '{c}': declared numeric but has dtype {df[c].dtype}")
    for c in dict.fromkeys(ds.numeric + ds.categorical + ds.sensitive):
        if c not in df.columns:
            continue
        col, chk = df[c], ds.checks.get(c)
        limit = chk.max_missing if chk is not None and chk.max_missing is not None \
            else ds.max_missing
        if c in ds.sensitive:
            limit = 0.0  # a group must be known for every row that is evaluated for fairness
        frac = float(col.isna().mean())
        if frac > limit:
            v.append(f"column '{c}': {frac:.1%} missing, above the limit {limit:.1%}")
        if chk is None:
            continue
        if chk.min is not None and is_numeric_dtype(col) and (col < chk.min).any():
            v.append(f"column '{c}': {int((col < chk.min).sum())} value(s) below min="
                     f"{chk.min} (smallest {col.min()})")
        if chk.max is not None and is_numeric_dtype(col) and (col > chk.max).any():
            v.append(f"column '{c}': {int((col > chk.max).sum())} value(s) above max="
                     f"{chk.max} (largest {col.max()})")
        if chk.categories is not None:
            bad = sorted(set(map(str, col.dropna().unique())) - set(map(str, chk.categories)))
            if bad:
                v.append(f"column '{c}': unexpected categories {bad[:10]} (allowed: "
                         f"{chk.categories})")
    if v:
        raise DataValidationError(name, v)
