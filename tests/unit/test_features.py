"""The feature store's point-in-time join (mlops_ray/data/featurestore.py), with Feast's DuckDB
offline store in this process (no server): the shipped example's known answer, leakage by a
late value, and a property test against DuckDB's own as-of join."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlops_ray.config.features import FeastCfg
from mlops_ray.data.featurestore import FeatureRepo
from mlops_ray.data.io import BUILTIN
from mlops_ray.errors import ConfigError, DataValidationError
from tests.conftest import dataset

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def test_the_join_returns_the_known_answer_and_refuses_future_and_late_values(tmp_path):
    """adult_people (tools/gen_adult_people.py): every person's work and finance history holds
    older, future and late (known after the label) decoys; only the value valid and known at
    the label's time is the Adult row's. The leakage-proof join returns Adult, row for row."""
    ds = dataset("adult_people_mlp")
    repo = FeatureRepo(ds.feast, str(tmp_path))
    entity = pd.read_parquet(BUILTIN / "adult_people.parquet")
    joined = repo.training_frame(entity)
    adult = pd.read_parquet(BUILTIN / "adult.parquet")
    cols = ds.numeric + ds.categorical
    assert list(joined.columns[:len(entity.columns)]) == list(entity.columns)
    assert (joined["person_id"].to_numpy() == entity["person_id"].to_numpy()).all()
    pd.testing.assert_frame_equal(joined[cols].astype(str), adult[cols].astype(str))
    # without the created-time filter, values known only after the label leak in
    leaky = FeatureRepo(ds.feast.model_copy(update={"filter_by_created_timestamp": False}),
                        str(tmp_path / "leaky")).training_frame(entity)
    differs = (leaky[cols].astype(str) != adult[cols].astype(str)).any(axis=1)
    work = pd.read_parquet(BUILTIN / "adult_people_work.parquet")
    late = work[work["created"] > work["person_id"].map(entity.set_index("person_id")
                                                          ["event_timestamp"])]
    assert differs.sum() > 1000 and set(np.flatnonzero(differs)) <= set(
        late["person_id"]) | set(pd.read_parquet(BUILTIN / "adult_people_finance.parquet")
                                 .pipe(lambda f: f[f["created"] > f["person_id"].map(
                                     entity.set_index("person_id")["event_timestamp"])])
                                 ["person_id"])


def test_the_dataset_version_covers_definitions_and_rows(tmp_path):
    from mlops_ray.config.base import StorageCfg
    from mlops_ray.data.prepare import prepare
    ds = dataset("adult_people_mlp")
    store = StorageCfg(uri=str(tmp_path))
    a = prepare(ds, 0, storage=store)
    assert a.summary()["feature_store"]["views"] == ["person_profile", "person_work",
                                                     "person_finance"]
    # a longer ttl changes what the views are, not the rows: the version still changes
    views = [v.model_copy(update={"ttl_s": 10**9}) if v.name == "person_profile" else v
             for v in ds.feast.views]
    b = prepare(ds.model_copy(update={"feast": ds.feast.model_copy(update={"views": views})}),
                0, storage=store)
    assert b.version != a.version
    pd.testing.assert_frame_equal(a.frame, b.frame)


def test_bad_definitions_and_entity_frames_are_named(tmp_path):
    ds = dataset("adult_people_mlp")
    with pytest.raises(ValueError, match="features in two views"):
        FeastCfg.model_validate({**ds.feast.plain(), "views": [
            {"name": "a", "source": "x.parquet", "features": ["f"]},
            {"name": "b", "source": "y.parquet", "features": ["f"]}]})
    repo = FeatureRepo(ds.feast, str(tmp_path))
    with pytest.raises(DataValidationError, match=r"lacks \['event_timestamp'\]"):
        repo.training_frame(pd.DataFrame({"person_id": [1]}))
    missing = ds.feast.model_copy(update={"views": [ds.feast.views[0].model_copy(
        update={"source": str(tmp_path / "nope.parquet")})]})
    with pytest.raises(Exception, match="nope.parquet"):
        FeatureRepo(missing, str(tmp_path / "m")).apply()
    with pytest.raises(ConfigError, match="dataset.feast.path: required"):
        FeatureRepo(ds.feast, "s3://bucket/prefix")
    from mlops_ray.config.compose import job
    from mlops_ray.config.train import TrainJob
    from mlops_ray.errors import ConfigError as CE
    with pytest.raises(CE, match="'occupation' is in no feature view"):
        job("train", TrainJob, ["+experiment=adult_people_mlp",
                                "dataset.feast.views.1.features=[workclass,hours_per_week]"])


# ----------------------------------------------------------------------- property test
def _cfg(root: Path, ttl_s: int) -> FeastCfg:
    return FeastCfg.model_validate({
        "project": "prop", "entity": "k", "join_key": "k",
        "views": [{"name": "v", "source": str(root / "src.parquet"), "features": ["x"],
                   "ttl_s": ttl_s}], "path": str(root / "store")})


def _reference(ent: pd.DataFrame, src: pd.DataFrame, created: bool, ttl_s: int) -> pd.Series:
    """DuckDB: its ASOF join where it can express the rule (event time only, no ttl); else
    the same rule as a ranked join (event and created time <= the row's, within the ttl)."""
    con = duckdb.connect()
    con.register("ent", ent.assign(_row=range(len(ent))))
    con.register("src", src)
    if not created and not ttl_s:
        sql = ("SELECT e._row, s.x FROM ent e ASOF LEFT JOIN src s "
               "ON e.k = s.k AND e.event_timestamp >= s.event_timestamp")
    else:
        cond = "s.event_timestamp <= e.event_timestamp"
        if created:
            cond += " AND s.created <= e.event_timestamp"
        if ttl_s:
            cond += f" AND s.event_timestamp >= e.event_timestamp - INTERVAL {ttl_s} SECOND"
        sql = (f"SELECT e._row, s.x FROM ent e LEFT JOIN src s ON e.k = s.k AND {cond} "
               "QUALIFY row_number() OVER (PARTITION BY e._row ORDER BY s.event_timestamp "
               "DESC, s.created DESC) = 1")
    out = con.execute(sql).df().sort_values("_row")
    return out["x"].reset_index(drop=True)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.booleans(), st.sampled_from([0, 5 * 3600]))
def test_the_join_matches_duckdb_as_of(tmp_path_factory, data, created, ttl_s):
    root = tmp_path_factory.mktemp("prop")
    n_keys = data.draw(st.integers(1, 4))
    # distinct event hours per key (ties are Feast's to break by created time: covered above)
    src_rows = []
    for k in range(n_keys):
        hours = data.draw(st.lists(st.integers(0, 48), min_size=0, max_size=6, unique=True))
        for h in hours:
            lag = data.draw(st.integers(0, 10))  # known `lag` hours after its event time
            src_rows.append((k, T0 + pd.Timedelta(hours=h), T0 + pd.Timedelta(hours=h + lag),
                             float(data.draw(st.integers(-50, 50)))))
    src = pd.DataFrame(src_rows, columns=["k", "event_timestamp", "created", "x"]).astype(
        {"k": "int64", "x": "float64"})
    for c in ("event_timestamp", "created"):
        src[c] = src[c].astype("datetime64[us, UTC]")
    src.to_parquet(root / "src.parquet", index=False)
    ent_rows = data.draw(st.lists(st.tuples(st.integers(0, n_keys), st.integers(0, 60)),
                                  min_size=1, max_size=12))
    ent = pd.DataFrame({"k": [k for k, _ in ent_rows],
                        "event_timestamp": [T0 + pd.Timedelta(hours=h) for _, h in ent_rows]})
    ent["event_timestamp"] = ent["event_timestamp"].astype("datetime64[us, UTC]")
    cfg = _cfg(root, ttl_s).model_copy(update={"filter_by_created_timestamp": created})
    got = FeatureRepo(cfg).training_frame(ent)["x"].astype("float64")
    want = _reference(ent, src, created, ttl_s).astype("float64")
    pd.testing.assert_series_equal(got, want, check_names=False)


def _online_lookup(root: Path, xs: Any, inputs: list[str]) -> Any:
    """A one-view store (key k = 0.., feature x = `xs`, all known on 2024-01-01), materialized,
    and serving's lookup of `inputs` on it."""
    from mlops_ray.features.online import OnlineLookup, entity_spec
    src = pd.DataFrame({"k": np.arange(len(xs), dtype="int64"),
                        "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC"),
                        "created": pd.Timestamp("2024-01-01", tz="UTC"), "x": xs})
    for c in ("event_timestamp", "created"):
        src[c] = src[c].astype("datetime64[us, UTC]")
    src.to_parquet(root / "src.parquet", index=False)
    cfg = _cfg(root, 0)
    repo = FeatureRepo(cfg)
    repo.materialize()
    return OnlineLookup(entity_spec(cfg.plain(), str(repo.root), inputs))


def test_concurrent_requests_share_online_reads_and_unknown_keys_are_404(tmp_path):
    """16 requests arrive while one online read is in flight: they share the next read (two
    store calls in all), each gets its own person's features, and an unknown key is a 404
    naming the record."""
    import asyncio
    import threading

    from mlops_ray.errors import RequestInvalid
    look = _online_lookup(tmp_path, np.arange(20, dtype="float64") * 10, ["x", "other"])
    assert look.features == ["x"]
    calls, first_in, release = [], threading.Event(), threading.Event()
    fetch = look.fetch

    def blocking_fetch(keys):
        calls.append(list(keys))
        first_in.set()
        release.wait(30)
        return fetch(keys)
    look.fetch = blocking_fetch  # type: ignore[method-assign]

    async def main():
        first = asyncio.create_task(look.enrich([{"k": 0}], 100))
        await asyncio.get_running_loop().run_in_executor(None, first_in.wait, 30)
        rest = [asyncio.create_task(look.enrich([{"k": i}], 100)) for i in range(1, 16)]
        bad = asyncio.create_task(look.enrich([{"k": 3}, {"k": 999}], 100))
        while len(look.waiting) < 16:  # every request queued behind the first read
            await asyncio.sleep(0)
        release.set()
        got = await asyncio.gather(first, *rest)
        with pytest.raises(RequestInvalid) as e:
            await bad
        return got, e.value
    got, err = asyncio.run(main())
    assert [g[0]["x"] for g in got] == [10.0 * i for i in range(16)]
    assert len(calls) == 2 and calls[0] == [0] and sorted(calls[1]) == sorted(
        [*range(1, 16), 3, 999])
    assert err.status == 404 and "records[1].k=999: unknown entity" in str(err)
    with pytest.raises(RequestInvalid, match=r"send only 'k'; \['x'\]"):
        look.keys([{"k": 1, "x": 2}], 100)
    with pytest.raises(RequestInvalid, match=r"records\[0\].k: must be a 64-bit integer, "
                                             r"got '5'"):
        look.keys([{"k": "5"}], 100)

    # a read that fails for one request's keys: the others sharing it are answered anyway
    def failing_fetch(keys):
        if 13 in keys:
            raise TypeError("the store refused key 13")
        return fetch(keys)
    look.fetch = failing_fetch  # type: ignore[method-assign]

    async def shared():
        return await asyncio.gather(*(look.enrich([{"k": k}], 100) for k in (11, 13, 12)),
                                    return_exceptions=True)
    a, b, c = asyncio.run(shared())
    assert a[0]["x"] == 110.0 and c[0]["x"] == 120.0 and isinstance(b, TypeError)


def test_a_loaded_version_has_its_store_open_and_a_hung_read_is_a_503(tmp_path):
    """Serving opens a version's online store when it loads the version (Feast's import and
    registry, a first read: seconds on a busy machine), so requests pay for reads only; a read
    that then hangs past the timeout is a 503 naming the store, not a request that never ends."""
    import asyncio
    import threading

    from mlops_ray.errors import RequestInvalid
    look = _online_lookup(tmp_path, [1.0, 2.0, 3.0], ["x"])
    assert look.repo._store is None
    look.open()  # what IngressCore.reconfigure does for a feature-store version
    assert look.repo._store is not None
    assert asyncio.run(look.enrich([{"k": 2}], 10)) == [{"x": 3.0}]

    release = threading.Event()
    fetch = look.fetch
    look.fetch = lambda keys: (release.wait(30), fetch(keys))[1]  # type: ignore[method-assign]
    look.timeout_s = 0.2
    try:
        with pytest.raises(RequestInvalid) as e:
            asyncio.run(look.enrich([{"k": 1}], 10))
    finally:
        release.set()
    assert e.value.status == 503 and "the online store did not answer in 0.2 s" in str(e.value)


def test_jobs_features_refuses_bad_input_with_exit_2(tmp_path, capsys):
    from mlops_ray.config.train import FeaturesJob
    from mlops_ray.features.ops import run
    from tests.conftest import in_process
    assert in_process("features", FeaturesJob, ["+experiment=adult_mlp"], run) == 2
    assert "has no feature store (dataset.feast)" in capsys.readouterr().err
    common = ["+experiment=adult_people_mlp", f"storage.uri={tmp_path}", "action=materialize"]
    assert in_process("features", FeaturesJob, [*common, "end=yesterday"], run) == 2
    assert "end='yesterday': not an ISO 8601 time" in capsys.readouterr().err
    assert in_process("features", FeaturesJob, [*common, "action=drop"], run) == 2
    assert not (tmp_path / "features").exists()  # nothing written before the input was checked
    assert in_process("features", FeaturesJob, ["+experiment=adult_people_mlp",
                                                f"storage.uri={tmp_path}", "action=apply"],
                      run) == 0
    assert json.loads(capsys.readouterr().out)["applied"] == ["person_profile", "person_work",
                                                              "person_finance"]


def test_compaction_merges_acknowledged_parts_and_finishes_an_interrupted_one(tmp_path):
    src = pd.DataFrame({"k": np.arange(3, dtype="int64"),
                        "event_timestamp": T0, "created": T0, "x": [0.0, 1.0, 2.0]})
    for c in ("event_timestamp", "created"):
        src[c] = src[c].astype("datetime64[us, UTC]")
    src.to_parquet(tmp_path / "src.parquet", index=False)
    repo = FeatureRepo(_cfg(tmp_path, 0))
    repo.apply()
    d = repo.view_dir("v")
    for i in range(5):  # five batches, one event each: key 0's value i at hour i + 1
        part = src.head(1).assign(x=float(10 + i), event_timestamp=T0 + pd.Timedelta(hours=i + 1))
        part.to_parquet(d / f"stream-{1000 + i}-0-{1000 + i}-0.parquet", index=False)
    ent = pd.DataFrame({"k": [0, 0], "event_timestamp": [T0 + pd.Timedelta(hours=3),
                                                        T0 + pd.Timedelta(hours=9)]})
    ent["event_timestamp"] = ent["event_timestamp"].astype("datetime64[us, UTC]")
    before = repo.training_frame(ent)["x"].tolist()
    assert before == [12.0, 14.0]
    out = repo.compact("v", upto="1003-0")  # batch 1004 is not acknowledged: left alone
    assert out["merged"] == 4 and out["rows"] == 4
    assert sorted(p.name for p in d.glob("*.parquet")) == [
        "base.parquet", "compacted-1000-0-1003-0.parquet", "stream-1004-0-1004-0.parquet"]
    assert repo.training_frame(ent)["x"].tolist() == before
    # an interrupted compaction: the merged file written, two of its parts not yet deleted
    for i in (1, 2):
        src.head(1).assign(x=float(10 + i), event_timestamp=T0 + pd.Timedelta(hours=i + 1)) \
            .to_parquet(d / f"stream-{1000 + i}-0-{1000 + i}-0.parquet", index=False)
    assert repo.training_frame(ent)["x"].tolist() == before  # identical duplicates: no change
    assert repo.compact("v")["merged"] == 0  # the leftovers go; one part alone is not merged
    assert sorted(p.name for p in d.glob("stream-*.parquet")) == [
        "stream-1004-0-1004-0.parquet"]
    rows = pd.concat([pd.read_parquet(p) for p in d.glob("*.parquet")])
    assert len(rows) == 3 + 5  # every event once


def test_naive_times_and_monitor_retraining_are_refused(tmp_path, capsys):
    src = pd.DataFrame({"k": [1], "event_timestamp": [pd.Timestamp("2024-01-01")],
                        "created": [pd.Timestamp("2024-01-01")], "x": [1.0]})
    src.to_parquet(tmp_path / "src.parquet", index=False)  # no time zone
    with pytest.raises(DataValidationError, match="column 'event_timestamp' is timestamp"):
        FeatureRepo(_cfg(tmp_path, 0)).apply()
    from mlops_ray.config.pipeline import MonitorJob
    from tests.conftest import in_process
    assert in_process("monitor", MonitorJob, ["+experiment=adult_people_mlp"],
                      lambda job: None) == 2
    assert "jobs.monitor cannot retrain it yet" in capsys.readouterr().err


def test_a_changed_source_is_named_not_ignored(tmp_path):
    src = pd.DataFrame({"k": np.arange(3, dtype="int64"), "event_timestamp": T0, "created": T0,
                        "x": [0.0, 1.0, 2.0]})
    for c in ("event_timestamp", "created"):
        src[c] = src[c].astype("datetime64[us, UTC]")
    src.to_parquet(tmp_path / "src.parquet", index=False)
    repo = FeatureRepo(_cfg(tmp_path, 0))
    repo.ensure_applied()
    src.assign(x=[5.0, 6.0, 7.0]).to_parquet(tmp_path / "src.parquet", index=False)
    with pytest.raises(ConfigError, match=r"dataset.feast.views\[v\].source='.*src.parquet' "
                                          r"\(\w+\): the store at .* was filled from"):
        FeatureRepo(_cfg(tmp_path, 0)).training_frame(
            src[["k", "event_timestamp"]])
