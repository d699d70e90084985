"""Datasets: validation reports every violation, hashing, splits, preprocessing on train only."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlops_ray.data import Preprocessor, dataset_version, load_table, prepare, validate_frame
from mlops_ray.errors import DataValidationError, StorageError
from tests.conftest import dataset


@pytest.fixture(scope="module")
def adult_cfg():
    return dataset("adult_mlp")


@pytest.fixture(scope="module")
def adult(adult_cfg):
    return load_table(adult_cfg.uri)


def test_builtin_datasets_load_with_declared_columns(adult, adult_cfg):
    assert len(adult) == 48842 and adult["income"].isin([0, 1]).all()
    assert round(adult["income"].mean(), 3) == 0.239
    german = load_table("builtin://german")
    assert len(german) == 1000 and {"sex", "age_group", "good_credit"} <= set(german.columns)
    validate_frame(adult, adult_cfg)


def test_unknown_builtin_names_the_allowed_ones():
    with pytest.raises(StorageError, match="builtin://adult"):
        load_table("builtin://nope")


def test_all_violations_reported_at_once(adult, adult_cfg):
    bad = adult.head(2000).copy()
    bad.loc[0, "age"] = 250
    bad.loc[1, "sex"] = "Unknown"
    bad.loc[2:1000, "occupation"] = None
    bad = bad.drop(columns=["hours_per_week"])
    bad.loc[3, "income"] = 7
    with pytest.raises(DataValidationError) as e:
        validate_frame(bad, adult_cfg)
    msg = str(e.value)
    assert "hours_per_week" in msg and "above max=100" in msg and "'Unknown'" in msg
    assert "occupation" in msg and "missing" in msg and "binary" in msg
    assert len(e.value.violations) == 5
    # a misspelled column: the one it probably meant is named
    renamed = adult.head(600).rename(columns={"hours_per_week": "hours_per_weak"})
    with pytest.raises(DataValidationError, match="'hours_per_week': did you mean "
                                                  "'hours_per_weak'"):
        validate_frame(renamed, adult_cfg)


def test_non_numeric_declared_numeric(adult, adult_cfg):
    bad = adult.head(2000).copy()
    bad["age"] = bad["age"].astype(str)
    with pytest.raises(DataValidationError, match="declared numeric"):
        validate_frame(bad, adult_cfg)


@pytest.mark.parametrize("seed", [0, 7])
def test_splits_are_scikit_learns_row_for_row(adult, adult_cfg, seed):
    """prepare.train_test_split replaces scikit-learn's in the driver (its import costs every
    job ~1 s): the same rows for the same seed, stratified or not, ties in the strata shares
    included, so runs and registered models keep their splits."""
    from sklearn.model_selection import train_test_split as sk_split

    from mlops_ray.data.prepare import _strata, joined, train_test_split
    rows = np.arange(3, len(adult) + 3)  # not 0..n-1: the rows are returned, not positions
    rng = np.random.default_rng(seed)
    cases = [(None, 0.2), (_strata(adult, [adult_cfg.label, *adult_cfg.sensitive]), 0.1),
             (joined(adult, ["sex"]), 0.33),
             # 7 equal strata: the shares' remainders tie, broken by the same random draws
             (pd.Series(rng.integers(0, 7, len(adult)).astype(str)), 0.25)]
    for strata, test_size in cases:
        ours = train_test_split(rows, test_size, seed, strata)
        theirs = sk_split(rows, test_size=test_size, random_state=seed, stratify=strata)
        for a, b in zip(ours, theirs):
            assert np.array_equal(a, b)
    small = pd.Series(["a"] * 5 + ["b"] * 3 + ["c"] * 2)
    for test_size in (0.3, 0.45):
        ours = train_test_split(np.arange(10), test_size, seed, small)
        theirs = sk_split(np.arange(10), test_size=test_size, random_state=seed, stratify=small)
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="3 strata"):
        train_test_split(np.arange(10), 0.1, seed, small)


def test_dataset_version_is_content_hash(adult):
    v = dataset_version(adult)
    assert v == dataset_version(adult.copy()) and len(v) == 16
    changed = adult.copy()
    changed.loc[5, "age"] += 1
    assert dataset_version(changed) != v


def test_prepare_is_deterministic_and_stratified(adult_cfg):
    a, b = prepare(adult_cfg, seed=0), prepare(adult_cfg, seed=0)
    for k in ("train", "val", "test"):
        assert np.array_equal(a.splits[k], b.splits[k])
    assert len(a.splits["test"]) == 16281  # the UCI test file
    assert not set(a.splits["train"]) & set(a.splits["val"])
    y = a.frame["income"].to_numpy()
    assert abs(y[a.splits["train"]].mean() - y[a.splits["val"]].mean()) < 0.01
    c = prepare(adult_cfg, seed=1)
    assert not np.array_equal(a.splits["val"], c.splits["val"])


def test_sensitive_attributes_are_not_features_by_default(adult_cfg):
    p = prepare(adult_cfg, seed=0)
    names = p.preprocessor.feature_names
    assert not any(n.startswith(("sex=", "race=")) for n in names)
    assert p.preprocessor.n_features == 98  # 6 numeric + 92 one-hot (no sex/race)
    q = prepare(adult_cfg.model_copy(update={"sensitive_as_features": True}), seed=0)
    assert any(n.startswith("sex=") for n in q.preprocessor.feature_names)


def test_preprocessor_fitted_on_training_rows_only():
    train = pd.DataFrame({"x": [1.0, 3.0, None], "c": ["a", "b", "a"]})
    p = Preprocessor.fit(train, ["x"], ["c"])
    assert p.medians["x"] == 2.0 and p.categories["c"] == ["a", "b"]
    out = p.transform(pd.DataFrame({"x": [None, 100.0], "c": ["z", "b"]}))
    assert out.shape == (2, 3)
    assert out[0].tolist()[1:] == [0.0, 0.0]  # unseen category -> all zeros
    assert out[1].tolist()[1:] == [0.0, 1.0]
    assert Preprocessor.from_dict(p.to_dict()).transform(train).tolist() == p.transform(train).tolist()


def test_pii_columns_are_dropped_before_anything(tmp_path, adult_cfg):
    df = load_table("builtin://german").assign(email=lambda d: [f"u{i}@x.org" for i in range(len(d))])
    p = prepare(dataset("german_mlp", "dataset.pii=[email]"), seed=0, frame=df)
    assert "email" not in p.frame.columns


def test_csv_by_path(tmp_path):
    df = load_table("builtin://german")
    path = tmp_path / "g.csv"
    df.to_csv(path, index=False)
    cfg = dataset("german_mlp", f"dataset.uri={path}")
    assert prepare(cfg, seed=0).version == dataset_version(load_table(str(path)))
    with pytest.raises(StorageError, match="file not found"):
        load_table(str(tmp_path / "missing.csv"))
