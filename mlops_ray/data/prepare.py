"""Load -> drop PII -> validate -> hash -> split -> fit preprocessing on the training part."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from mlops_ray.data.io import dataset_version, load_table
from mlops_ray.data.preprocess import Preprocessor
from mlops_ray.data.validate import validate_frame


@dataclass
class Prepared:
    frame: pd.DataFrame  # PII already dropped
    version: str
    splits: dict[str, np.ndarray]  # row positions of train / val / test
    preprocessor: Preprocessor
    label: str
    positive: Any
    sensitive: list[str]

    def labels(self, rows: pd.DataFrame) -> np.ndarray:
        """0/1 labels (float32) of raw rows: 1 where the label equals `positive`."""
        return (rows[self.label].astype(str) == str(self.positive)).to_numpy(np.float32)

    def xy(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self.frame.iloc[self.splits[split]]
        return self.preprocessor.transform(rows), self.labels(rows)

    def summary(self) -> dict[str, Any]:
        y = self.labels(self.frame)
        return {"version": self.version, "rows": len(self.frame),
                "positive_rate": round(float(y.mean()), 4),
                "splits": {k: int(len(v)) for k, v in self.splits.items()},
                "n_features": self.preprocessor.n_features}


def _strata(df: pd.DataFrame, cols: list[str]) -> pd.Series | None:
    """Label x sensitive groups, so small groups appear in every split; coarser if too small."""
    for k in range(len(cols), 0, -1):
        key = df[cols[:k]].astype(str).agg("|".join, axis=1)
        if key.value_counts().min() >= 4:
            return key
    return None


def split_rows(df: pd.DataFrame, cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    s = cfg.get("split", {})
    pos = np.arange(len(df))
    strat_cols = [cfg["label"], *cfg["sensitive"]]
    if s.get("column"):
        is_test = (df[s["column"]].astype(str) == str(s.get("test_value", "test"))).to_numpy()
        rest, test = pos[~is_test], pos[is_test]
    else:
        rest, test = train_test_split(pos, test_size=s.get("test", 0.2), random_state=seed,
                                      stratify=_strata(df, strat_cols))
    train, val = train_test_split(rest, test_size=s.get("val", 0.1), random_state=seed,
                                  stratify=_strata(df.iloc[rest], strat_cols))
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def prepare(cfg: dict[str, Any], seed: int, frame: pd.DataFrame | None = None,
            storage: dict[str, Any] | None = None) -> Prepared:
    """`cfg` is the validated `dataset` section (plain dict). Deterministic for a given seed."""
    storage = storage or {}
    df = frame if frame is not None else load_table(
        cfg["uri"], cfg.get("format", "auto"), storage.get("endpoint_url"), storage.get("region"))
    df = df.drop(columns=[c for c in cfg.get("pii", []) if c in df.columns])
    validate_frame(df, cfg)
    df = df.reset_index(drop=True)
    splits = split_rows(df, cfg, seed)
    y = (df[cfg["label"]].astype(str) == str(cfg.get("positive", 1))).to_numpy()
    bad = [f"split '{k}' has {len(v)} rows and {len(set(y[v]))} label value(s); it needs rows of "
           "both classes (check dataset.split)" for k, v in splits.items()
           if len(v) == 0 or len(set(y[v])) < 2]
    if bad:
        from mlops_ray.errors import DataValidationError
        raise DataValidationError(cfg["name"], bad)
    sens = set(cfg["sensitive"]) if not cfg.get("sensitive_as_features") else set()
    numeric = [c for c in cfg["numeric"] if c not in sens]
    categorical = [c for c in cfg["categorical"] if c not in sens]
    pre = Preprocessor.fit(df.iloc[splits["train"]], numeric, categorical)
    return Prepared(df, dataset_version(df), splits, pre, cfg["label"], cfg.get("positive", 1),
                    list(cfg["sensitive"]))
