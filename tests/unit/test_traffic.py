"""The prediction log as data (no Ray, no server): its writer, the point-in-time label join,
late-label import, the live gates and the retraining table (#18)."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from mlops_ray.data import traffic
from mlops_ray.storage import resolve

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def pred(rid: str, minutes: float, version: int = 1, n: int = 1, p: float = 0.7,
         records: list | None = None) -> dict:
    return {"request_id": rid, "ts": at(minutes), "model": "m", "version": version,
            "arm": "stable", "endpoint": "predict",
            "records": records or [{"age": 30.0 + i, "job": "x"} for i in range(n)],
            "probabilities": [p] * n, "labels": [int(p >= 0.5)] * n, "latency_ms": 1.5}


def lab(rid: str, label: int, minutes: float, row: int = 0) -> dict:
    return {"request_id": rid, "labels": [label], "rows": [row], "label_ts": at(minutes),
            "source": "test"}


def write(store, log: str, table, writer: str = "w", seq: int = 0, day: str = "2026-11-30"):
    store.write_bytes(traffic.parquet_bytes(table),
                      traffic.part_path(log, "m", day, writer, seq))


def test_point_in_time_join_known_answers(tmp_path):
    """Labels count only once known (label_ts <= cutoff), the latest one known wins, predictions
    after the cutoff and labels of unknown requests are left out."""
    store = resolve(str(tmp_path))
    write(store, traffic.PREDICTIONS, traffic.prediction_table(
        [pred("a", 0), pred("b", 1, n=2), pred("late", 30)]))
    write(store, traffic.LABELS, traffic.label_table(
        [lab("a", 1, 10), lab("a", 0, 20), lab("b", 1, 25, row=1), lab("ghost", 1, 5),
         lab("late", 1, 31)]))
    preds, pparts = traffic.read(store, traffic.PREDICTIONS, "m")
    labels, _ = traffic.read(store, traffic.LABELS, "m")
    assert len(preds) == 4 and pparts == ["predictions/model=m/date=2026-11-30/part-w-000000.parquet"]

    def outcomes(minutes):
        j = traffic.labelled(preds, labels, at(minutes))
        return {(r, k): y for r, k, y in zip(j["request_id"], j["row"], j["outcome"])}

    assert outcomes(5) == {}                           # nothing known yet ("ghost": no request)
    assert outcomes(15) == {("a", 0): 1}               # the first label of "a"
    assert outcomes(20) == {("a", 0): 0}               # corrected at minute 20
    assert outcomes(26) == {("a", 0): 0, ("b", 1): 1}  # b's row 1 only; row 0 is unlabelled
    assert outcomes(29) == outcomes(26)                # "late" was answered at minute 30
    assert outcomes(40) == {("a", 0): 0, ("b", 1): 1, ("late", 0): 1}


def test_parts_of_later_days_are_not_read_before_their_day(tmp_path):
    store = resolve(str(tmp_path))
    write(store, traffic.PREDICTIONS, traffic.prediction_table([pred("a", 0)]))
    tomorrow = pred("t", 24 * 60)
    write(store, traffic.PREDICTIONS, traffic.prediction_table([tomorrow]), day="2026-12-01")
    (tmp_path / "predictions/model=m/date=2026-11-30/part-w-000009.parquet.tmp-1").write_bytes(
        b"half a part")  # a write in progress: never read
    assert traffic.read(store, traffic.PREDICTIONS, "m", at(60))[0]["request_id"].tolist() == ["a"]
    assert sorted(traffic.read(store, traffic.PREDICTIONS, "m")[0]["request_id"]) == ["a", "t"]


def test_traffic_rows_take_the_original_columns_and_label_values():
    original = pd.DataFrame({"age": [20, 40, 60], "job": ["a", "b", "c"], "sex": ["F", "M", "F"],
                             "income": [">50K", "<=50K", "<=50K"]})
    rows = pd.DataFrame({"features": ['{"age": 33.0, "job": "z"}', '{"age": 50.0, "job": "a"}'],
                         "outcome": [1, 0]})
    t = traffic.traffic_table(rows, original, "income", ">50K")
    assert list(t.columns) == list(original.columns)
    assert t["income"].tolist() == [">50K", "<=50K"]
    assert t["age"].tolist() == [33.0, 50.0] and t["sex"].isna().all()
    mixed = traffic.mix(original, t, original_ratio=1.0, seed=0)
    assert len(mixed) == 4 and mixed.tail(2)["job"].tolist() == ["z", "a"]
    assert mixed.equals(traffic.mix(original, t, 1.0, 0))  # seeded: the same table
    assert len(traffic.mix(original, t, 10.0, 0)) == 5     # every original row at most
    with pytest.raises(Exception, match="no label other than the positive"):
        traffic.negative_value(pd.Series([">50K"]), ">50K")


def logger(tmp_path, **cfg):
    from mlops_ray.serving.predlog import PredictionLogger
    c = {"uri": str(tmp_path / "log"), "sample_rate": 1.0, "flush_interval_s": 3600,
         "flush_rows": 1000, "max_buffer_rows": 10000, "log_sensitive": False, "exclude": [],
         **cfg}
    return PredictionLogger(c, {"uri": str(tmp_path)}, "m", "rep1")


SIG = {"inputs": [{"name": "age"}, {"name": "job"}, {"name": "sex", "role": "sensitive"}]}


def answer(lg, rid: str, n: int = 1) -> None:
    lg.prediction(rid, "m:3", SIG, "canary", "predict",
                  [{"age": 1.0, "job": "x", "sex": "F"}] * n,
                  {"probabilities": [0.25] * n, "labels": [0] * n}, 2.0)


def test_logger_writes_one_row_per_answered_record_without_sensitive_fields(tmp_path):
    lg = logger(tmp_path)

    async def go():
        answer(lg, "r1")
        answer(lg, "r2", n=3)
        lg.feedback("r2", [1, 0, 1])
        return await lg.flush(), await lg.flush()
    assert asyncio.run(go()) == (7, 0)  # 4 prediction rows + 3 labels; nothing left after
    store = resolve(str(tmp_path / "log"))
    df, _ = traffic.read(store, traffic.PREDICTIONS, "m")
    assert sorted(zip(df["request_id"], df["row"])) == [("r1", 0), ("r2", 0), ("r2", 1),
                                                         ("r2", 2)]
    assert set(df["version"]) == {3} and set(df["arm"]) == {"canary"}
    assert traffic.features_frame(df).columns.tolist() == ["age", "job"]  # "sex" left out
    labels, _ = traffic.read(store, traffic.LABELS, "m")
    assert labels["label"].tolist() == [1, 0, 1] and labels["row"].tolist() == [0, 1, 2]
    lg2 = logger(tmp_path / "b", log_sensitive=True, exclude=["job"])
    answer(lg2, "r1")
    asyncio.run(lg2.flush())
    df2, _ = traffic.read(resolve(str(tmp_path / "b" / "log")), traffic.PREDICTIONS, "m")
    assert traffic.features_frame(df2).columns.tolist() == ["age", "sex"]


def test_logger_flushes_when_full_and_drops_beyond_its_bound(tmp_path):
    lg = logger(tmp_path, flush_rows=2, max_buffer_rows=3)
    answer(lg, "r1")
    assert not lg.wake.is_set()
    answer(lg, "r2")
    assert lg.wake.is_set()  # the background loop writes now, not at the next tick
    answer(lg, "r3")
    answer(lg, "r4")  # the 4th row does not fit: dropped, counted
    assert (lg.rows, lg.dropped) == (3, 1)
    assert lg.lag_s() >= 0 and asyncio.run(lg.flush()) == 3 and lg.lag_s() == 0.0
    sampled = logger(tmp_path / "s", sample_rate=0.0)
    answer(sampled, "r1")
    assert sampled.rows == 0


def test_a_failing_store_keeps_the_rows_and_writes_them_later(tmp_path):
    blocker = tmp_path / "log"
    blocker.write_text("a file where the log's folder should be")
    lg = logger(tmp_path)
    answer(lg, "r1")
    lg.feedback("r1", [1])
    assert asyncio.run(lg.flush()) == 0 and lg.rows == 2  # the write failed: kept
    blocker.unlink()
    answer(lg, "r2")
    assert asyncio.run(lg.flush()) == 3
    df, _ = traffic.read(resolve(str(blocker)), traffic.PREDICTIONS, "m")
    assert df["request_id"].tolist() == ["r1", "r2"]  # in order, once each


def test_live_gates_judge_labelled_traffic_with_the_gates_code():
    from mlops_ray.evaluation.live import live_report
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    p_good = np.clip(y * 0.6 + rng.random(n) * 0.4, 0, 1)
    g = pd.DataFrame({"sex": rng.choice(["F", "M"], n), "race": [None] * n})
    rules = [{"name": "auc", "metric": "test/auc", "op": ">=", "threshold": 0.85, "on": "ci_low"},
             {"name": "eo_sex", "metric": "fair/eo_diff_sex", "op": "<=", "threshold": 0.2},
             {"name": "eo_race", "metric": "fair/eo_diff_race", "op": "<=", "threshold": 0.2},
             {"name": "cv", "metric": "cv/auc_mean", "op": ">=", "threshold": 0.8}]
    good = live_report(y, p_good, (p_good >= 0.5).astype(int), g, rules, 0.5, 30, 100, 0)
    assert {r["name"] for r in good["gates"]} == {"auc", "eo_sex"} and good["failed"] == []
    assert {s["name"] for s in good["not_applicable"]} == {"eo_race", "cv"}
    # the same traffic answered at random: the AUC gate would fail, by its CI's lower end
    p_bad = rng.random(n)
    bad = live_report(y, p_bad, (p_bad >= 0.5).astype(int), g, rules, 0.5, 30, 100, 0)
    assert "auc" in bad["failed"] and bad["rows"] == n
    # a gap between groups the decision creates: the fairness gate fails
    unfair = np.where(g["sex"] == "F", 0, y)
    assert "eo_sex" in live_report(y, p_good, unfair, g, rules, 0.5, 30, 100, 0)["failed"]


def monitor_job(tmp_path, *overrides: str):
    from mlops_ray.config import validate
    from mlops_ray.config.compose import compose
    from mlops_ray.config.pipeline import MonitorJob
    return validate(compose("monitor", ["+experiment=adult_mlp", f"storage.uri={tmp_path}",
                                        *overrides]), MonitorJob)


def adult_traffic(tmp_path, n: int = 300) -> pd.DataFrame:
    """n Adult rows answered by version 1 and labelled an hour later (what the served app
    logs, sensitive attributes included)."""
    from mlops_ray.data.io import load_table
    rows = load_table("builtin://adult").head(n)
    feats = rows.drop(columns=["income", "uci_split"])
    recs = [{k: (float(v) if isinstance(v, (int, float, np.integer, np.floating)) else v)
             for k, v in r.items()} for r in feats.to_dict("records")]
    store = resolve(str(tmp_path / "prediction_log"))
    write(store, traffic.PREDICTIONS, traffic.prediction_table(
        [pred(f"r{i}", i / 60, records=[rec]) for i, rec in enumerate(recs)]))
    write(store, traffic.LABELS, traffic.label_table(
        [lab(f"r{i}", int(y), 60) for i, y in enumerate(rows["income"])]))
    return rows


def test_retraining_table_from_the_log_names_its_sources(tmp_path):
    from mlops_ray.data import prepare
    from mlops_ray.errors import ConfigError
    from mlops_ray.pipeline import traffic as loop
    rows = adult_traffic(tmp_path, n=400)
    job = monitor_job(tmp_path, "serve.prediction_log.log_sensitive=true",
                      "monitor.cutoff=2026-11-30T13:30:00", "monitor.original_ratio=2")
    cutoff = loop.cutoff_of(job)
    labelled, sources = loop.labelled_traffic(job, "m", cutoff)
    assert len(labelled) == 400 and len(sources["prediction_parts"]) == 1
    ds = loop.retraining_table(job, labelled, sources, cutoff)
    table = pd.read_parquet(ds["uri"].removeprefix("file://"))
    assert len(table) == 1200 and ds["sources"]["rows"] == {"traffic": 400, "original": 800}
    back = table.tail(400).reset_index(drop=True)
    assert back["income"].tolist() == rows["income"].tolist()  # outcomes as label values
    assert back["age"].tolist() == rows["age"].astype(float).tolist()
    assert ds["sources"]["label_parts"] and ds["sources"]["cutoff"].startswith("2026-11-30T13:30")
    prepared = prepare(job.dataset.model_validate(ds), job.seed)  # a table the pipeline takes
    assert len(prepared.frame) == 1200
    # a seeded share of the traffic rows (dataset.split.test) is held out for the gates
    assert 0.1 < (back["uci_split"] == "test").mean() < 0.3
    # the same log, cutoff and rule: the same table (a reproducible retraining)
    assert loop.retraining_table(job, labelled, sources, cutoff)["uri"] == ds["uri"]
    # before the labels were known there is nothing to learn from
    early = loop.labelled_traffic(job, "m", at(30))[0]
    with pytest.raises(Exception, match="no labelled traffic known"):
        loop.retraining_table(job, early, sources, at(30))
    with pytest.raises(ConfigError, match="log_sensitive"):
        loop.retraining_table(monitor_job(tmp_path), labelled, sources, cutoff)


def test_label_import_validates_first_and_is_idempotent(tmp_path):
    from mlops_ray.config import validate
    from mlops_ray.config.compose import compose
    from mlops_ray.config.pipeline import LabelsJob
    from mlops_ray.errors import DataValidationError
    from mlops_ray.pipeline.traffic import import_labels
    adult_traffic(tmp_path, n=5)
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,label,time\nr0,1,2026-11-30T14:00:00Z\nr1,yes,2026-11-30\n"
                   "r2,0,not a time\n")

    def job(f):
        return validate(compose("labels", ["+experiment=adult_mlp", f"storage.uri={tmp_path}",
                                           f"file={f}", "promote.model=m"]), LabelsJob)
    with pytest.raises(DataValidationError) as e:
        import_labels(job(bad), log=lambda m: None)
    assert "label: rows [1] hold 'yes'" in str(e.value) and "time: row 2" in str(e.value)
    assert not (tmp_path / "prediction_log" / "labels").exists() or \
        len(traffic.parts(resolve(str(tmp_path / "prediction_log")), traffic.LABELS, "m")) == 1
    good = tmp_path / "good.csv"
    good.write_text("request_id,label,time\nr0,1,2026-11-30T14:00:00Z\nr3,0,2026-11-30T14:05Z\n"
                    "nobody,1,2026-11-30T14:06Z\n")
    out = import_labels(job(good), log=lambda m: None)
    assert (out["labels"], out["matched"]) == (3, 2)
    assert import_labels(job(good), log=lambda m: None)["part"] == out["part"]  # no duplicate
    store = resolve(str(tmp_path / "prediction_log"))
    assert len(traffic.parts(store, traffic.LABELS, "m")) == 2  # adult_traffic's + this file's
    labels, _ = traffic.read(store, traffic.LABELS, "m")
    assert (labels["source"] == "good.csv").sum() == 3


def test_batch_rows_take_the_log_schema_and_a_rerun_replaces_earlier_parts(tmp_path):
    """jobs.predict's log rows (predict/predlog.py): the online writer's stripping, numbers as
    float and categories as strings like the validator's, row ids as request_id; parts placed
    whole, and a later run of the same job replaces the parts of earlier ones (not others')."""
    import json

    import pyarrow as pa

    from mlops_ray.predict import predlog
    sig = {"inputs": [{"name": "age", "kind": "numeric"}, {"name": "job", "kind": "categorical"},
                      {"name": "zip", "kind": "categorical"},
                      {"name": "sex", "kind": "categorical", "role": "sensitive"},
                      {"name": "race", "kind": "categorical", "role": "sensitive"}]}
    cols = ["age", "job", "zip", "sex", "id"]  # no race in this input; id is not an input
    assert predlog.logged_fields(sig, cols, False, ["zip"]) == (["age", "job"], ["age"])
    assert predlog.logged_fields(sig, cols, True, []) == (["age", "job", "zip", "sex"], ["age"])

    block = pa.table({"age": pa.array([30, None, 41], pa.int64()),
                      "job": ["x", None, "y"], "zip": pa.array([5054.0, 7.5, None]),
                      "id": [10, 11, 12]})
    feats = predlog.features_json(block, ["age", "job", "zip"], ["age"]).to_pylist()
    assert [json.loads(f) for f in feats] == [{"age": 30.0, "job": "x", "zip": "5054"},
                                              {"age": None, "job": None, "zip": "7.5"},
                                              {"age": 41.0, "job": "y", "zip": None}]
    assert predlog.request_ids(block, "id").to_pylist() == ["10", "11", "12"]
    src = pa.table({"source_file": ["a.csv", "a.csv"], "source_row": [0, 1]})
    assert predlog.request_ids(src, None).to_pylist() == ["a.csv:0", "a.csv:1"]

    store = resolve(str(tmp_path / "log"))
    staging = tmp_path / "staging"
    key = predlog.job_key("m:1", "h", "file:///in", "id", [("a.parquet", 10, None)])
    assert key != predlog.job_key("m:1", "h", "file:///in", "id", [("a.parquet", 11, None)])
    placed = {}
    for run in ("20261130T120000-aaaaaaaa", "20261130T130000-bbbbbbbb"):
        log = predlog.BatchLog(store, "m", 1, T0, key, run, "id")
        rows = log.rows(block.append_column(predlog.FEATURES, pa.array(feats)).append_column(
            "probability", pa.array([0.2, 0.6, 0.9])).append_column(
            "label", pa.array([0, 1, 1])))
        assert rows.schema == traffic.PREDICTION_SCHEMA and rows["arm"][0].as_py() == "batch"
        rel = log.part(0)
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(traffic.parquet_bytes(rows))
        placed[run] = log.publish(store.fs, str(staging), [rel])
        replaced = log.replace_earlier()
    other = predlog.BatchLog(store, "m", 1, T0, "0" * 12, "20261130T110000-cccccccc", "id")
    write(store, traffic.PREDICTIONS, traffic.prediction_table([pred("online", 0)]))
    store.write_bytes(traffic.parquet_bytes(rows), other.part(0))  # another job's batch
    assert replaced == placed["20261130T120000-aaaaaaaa"]
    assert rel.startswith(f"predictions/model=m/date=2026-11-30/part-batch-{key}-20261130T13")
    got, names = traffic.read(store, traffic.PREDICTIONS, "m")
    assert sorted(names) == sorted([rel, other.part(0), "predictions/model=m/date=2026-11-30/"
                                    "part-w-000000.parquet"])
    assert got["latency_ms"].isna().sum() == 6 and len(got) == 7
    assert predlog.superseded(names, key, "20261201T000000-dddddddd") == [rel]
