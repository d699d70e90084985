"""Load -> drop PII -> validate -> hash -> split -> fit preprocessing on the training part."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlops_ray.data.io import dataset_version, load_table
from mlops_ray.data.preprocess import Preprocessor
from mlops_ray.data.validate import validate_frame

if TYPE_CHECKING:
    from mlops_ray.config.base import StorageCfg
    from mlops_ray.config.train import DatasetCfg


@dataclass
class Prepared:
    frame: pd.DataFrame  # PII already dropped
    version: str
    splits: dict[str, np.ndarray]  # row positions of train / val / test
    preprocessor: Preprocessor
    label: str
    positive: Any
    sensitive: list[str]
    key: str = ""  # hash of the dataset config and seed it was prepared from (reuse check)
    # dataset.feast: the views joined and their definitions' hash (lineage)
    features: dict[str, Any] | None = None

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
                "n_features": self.preprocessor.n_features,
                **({"feature_store": self.features} if self.features else {})}


def joined(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """The columns' values as one "a|b|c" string per row (vectorised: a row-wise join is
    seconds on a 50k-row table)."""
    key = df[cols[0]].astype(str)
    for c in cols[1:]:
        key = key + "|" + df[c].astype(str)
    return key


def _strata(df: pd.DataFrame, cols: list[str]) -> pd.Series | None:
    """Label x sensitive groups, so small groups appear in every split; coarser if too small."""
    for k in range(len(cols), 0, -1):
        key = joined(df, cols[:k])
        if key.value_counts().min() >= 4:
            return key
    return None


def split_rows(df: pd.DataFrame, ds: DatasetCfg, seed: int) -> dict[str, np.ndarray]:
    s = ds.split
    pos = np.arange(len(df))
    strat_cols = [ds.label, *ds.sensitive]
    if s.column:
        is_test = (df[s.column].astype(str) == str(s.test_value)).to_numpy()
        rest, test = pos[~is_test], pos[is_test]
    else:
        rest, test = train_test_split(pos, s.test, seed, _strata(df, strat_cols))
    train, val = train_test_split(rest, s.val, seed, _strata(df.iloc[rest], strat_cols))
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def train_test_split(rows: np.ndarray, test_size: float, seed: int, strata: pd.Series | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's `train_test_split(rows, test_size=, random_state=seed, stratify=strata)`
    step for step, so the same seed gives the same rows (tests/unit/test_data.py compares
    them), without importing scikit-learn: ~1 s in every driver before its job starts."""
    n = len(rows)
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    rng = np.random.RandomState(seed)
    if strata is None:  # ShuffleSplit
        perm = rng.permutation(n)
        return rows[perm[n_test:]], rows[perm[:n_test]]
    # StratifiedShuffleSplit: each stratum's share of both parts (its "approximate mode")
    _, codes, counts = np.unique(np.asarray(strata), return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_test) < len(counts):
        raise ValueError(f"cannot split {n} rows in {len(counts)} strata (smallest "
                         f"{counts.min()}) with test_size={test_size}")
    members = np.split(np.argsort(codes.ravel(), kind="stable"), np.cumsum(counts)[:-1])
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, m in enumerate(members):
        shuffled = m.take(rng.permutation(counts[i]), mode="clip")
        train.extend(shuffled[:n_i[i]])
        test.extend(shuffled[n_i[i]:n_i[i] + t_i[i]])
    return rows[rng.permutation(train)], rows[rng.permutation(test)]


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState
                      ) -> np.ndarray:
    """Draws per stratum: floor of its share, the rest to the largest remainders, ties broken
    at random (scikit-learn's `_approximate_mode`)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def prepare(ds: DatasetCfg, seed: int, frame: pd.DataFrame | None = None,
            storage: StorageCfg | None = None) -> Prepared:
    """Load (unless `frame` is given) -> drop PII -> validate -> hash -> split -> fit the
    preprocessing on the training rows. Deterministic for a given seed."""
    features = None
    if frame is not None:
        df = frame
    else:
        df = load_table(ds.uri, ds.format, storage.endpoint_url if storage else None,
                        storage.region if storage else None)
        if ds.feast is not None:  # df is the entity frame: join the feature views to it
            from mlops_ray.data.featurestore import FeatureRepo
            repo = FeatureRepo(ds.feast, storage.uri if storage else "outputs")
            df = repo.training_frame(df)
            features = {"project": ds.feast.project, "store": str(repo.root),
                        "views": [v.name for v in ds.feast.views],
                        "definitions": repo.definitions_hash()}
    df = df.drop(columns=[c for c in ds.pii if c in df.columns])
    validate_frame(df, ds)
    df = df.reset_index(drop=True)
    splits = split_rows(df, ds, seed)
    y = (df[ds.label].astype(str) == str(ds.positive)).to_numpy()
    bad = [f"split '{k}' has {len(v)} rows and {len(set(y[v]))} label value(s); it needs rows of "
           "both classes (check dataset.split)" for k, v in splits.items()
           if len(v) == 0 or len(set(y[v])) < 2]
    if bad:
        from mlops_ray.errors import DataValidationError
        raise DataValidationError(ds.name, bad)
    numeric, categorical = ds.features()
    pre = Preprocessor.fit(df.iloc[splits["train"]], numeric, categorical)
    version = dataset_version(df)
    if features:  # the joined rows and what the views are
        from mlops_ray.utils import stable_hash
        version = stable_hash([version, features["definitions"]], 16)
    return Prepared(df, version, splits, pre, ds.label, ds.positive,
                    list(ds.sensitive), prepared_key(ds.model_dump(by_alias=True), seed),
                    features)


def prepared_key(dataset: dict[str, Any], seed: int) -> str:
    """Same key, same rows in the same splits: what a stage may reuse from another."""
    from mlops_ray.config.train import hashed_dataset
    from mlops_ray.utils import stable_hash
    return stable_hash([hashed_dataset(dataset), seed])
