"""Batch scoring (`jobs.predict`) with Ray Data on the shared local cluster: predictions equal
the Predictor that Serve replicas run, row ids line up, CSV with an id column and a drift alert,
S3 in and out (moto), errors that name the column, a failed job that leaves the previous output
complete, batch rows in the online prediction log (#18), and a 50x Adult file scored by workers
whose memory stays far below the table's.

Registry versions are small models fitted in-process on Adult (tests/serving.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlops_ray.artifacts.predictor import Predictor
from mlops_ray.config.batch import PredictJob
from mlops_ray.config.compose import job
from mlops_ray.data import prepare, traffic
from mlops_ray.data.io import BUILTIN
from mlops_ray.errors import DataValidationError
from mlops_ray.predict.job import run
from mlops_ray.registry import Policy, Registry
from mlops_ray.storage import resolve
from tests.conftest import dataset, run_job
from tests.serving import MODEL, make_version

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def prepared():
    return prepare(dataset("adult_mlp"), 0)


@pytest.fixture(scope="module")
def env(ray_2_cpus, prepared, tmp_path_factory):
    store = tmp_path_factory.mktemp("predict")
    # the registry where jobs.predict looks with storage.uri=<store> (db: <store>/mlops_ray.db)
    reg = Registry(f"sqlite:///{store / 'mlops_ray.db'}", resolve(str(store)), Policy.default())
    v = make_version(reg, prepared, 0)
    reg.set_alias(MODEL, "production", v.version, expected=None)
    _, folder = reg.fetch(v.ref)
    rows = prepared.frame.iloc[prepared.splits["test"]].reset_index(drop=True)
    return {"store": store, "reg": reg, "v": v, "gcs": ray_2_cpus, "rows": rows,
            "predictor": Predictor.load(folder, v.ref)}


def job_args(env, inp, out, *extra: str) -> list[str]:
    return [f"ref={MODEL}@production", f"input={inp}", f"output={out}",
            f"storage.uri={env['store']}", f"ray.address={env['gcs']}", *extra]


def make_job(env, inp, out, *extra: str) -> PredictJob:
    return job("predict", PredictJob, job_args(env, inp, out, *extra))


def test_predictions_equal_the_predictor_and_ids_line_up(env, tmp_path):
    rows, v = env["rows"], env["v"]
    data = tmp_path / "in"
    (data / "day=2").mkdir(parents=True)
    # a folder of two files, several row groups each: ids must point at the right file and row
    pq.write_table(pa.Table.from_pandas(rows.iloc[:7000], preserve_index=False),
                   data / "a.parquet", row_group_size=2500)
    pq.write_table(pa.Table.from_pandas(rows.iloc[7000:], preserve_index=False),
                   data / "day=2" / "b.parquet", row_group_size=4000)
    (data / "_ignored.parquet").write_bytes(b"not parquet: names starting with _ are skipped")
    out = tmp_path / "scored"
    manifest = run(make_job(env, data, out, "predict.batch_size=1000"), log=lambda _: None)

    got = pd.read_parquet(out / "predictions")
    assert len(got) == len(rows) == manifest["rows_scored"]
    assert set(got["source_file"]) == {"a.parquet", "day=2/b.parquet"}
    offset = got["source_file"].map({"a.parquet": 0, "day=2/b.parquet": 7000}).astype(int)
    got = got.assign(pos=offset + got["source_row"]).sort_values("pos")
    assert got["pos"].tolist() == list(range(len(rows)))  # every row exactly once
    expected = env["predictor"].predict_proba(rows)
    np.testing.assert_allclose(got["probability"].to_numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["label"].to_numpy(), (expected >= 0.5).astype(int))
    assert set(got["model"].astype(str)) == {v.ref}
    assert set(got["content_hash"].astype(str)) == {v.content_hash}

    success = json.loads((out / "_SUCCESS").read_text())
    assert success["status"] == "complete" and success["model"] == v.ref
    assert [f"predictions/{p.name}" for p in sorted((out / "predictions").iterdir())] == \
        success["files"]
    report = json.loads((out / "drift_report.json").read_text())
    assert report["rows_scored"] == len(rows) and report["alerts"] == []  # same distribution
    assert {r["feature"] for r in report["features"]} >= {"age", "workclass", "sex"}
    assert not (out / "_temporary").exists()


def test_csv_with_id_column_shows_drift_and_a_failed_rerun_keeps_the_output(env, tmp_path):
    rows = env["rows"].iloc[:4000].copy()
    rows["customer_id"] = [f"c{i:05d}" for i in np.random.default_rng(0).permutation(len(rows))]
    rows["age"] = rows["age"] + 15  # a shifted batch
    src = tmp_path / "rows.csv"
    rows.to_csv(src, index=False)
    out = tmp_path / "scored"
    r = run_job(["jobs.predict", *job_args(env, src, out, "predict.id_column=customer_id")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scored      4000 rows" in r.stdout and "drift" in r.stdout
    assert "age" in r.stdout.split("drift", 1)[1].splitlines()[0]  # named on the drift line

    got = pd.read_parquet(out / "predictions").set_index("customer_id")
    assert list(got.columns) == ["probability", "label", "model", "content_hash"]
    want = pd.Series(env["predictor"].predict_proba(rows), index=rows["customer_id"])
    np.testing.assert_allclose(got["probability"].loc[want.index].to_numpy(), want.to_numpy(),
                               rtol=0, atol=1e-6)
    report = json.loads((out / "drift_report.json").read_text())
    assert report["alerts"] == ["age"]
    age = next(f for f in report["features"] if f["feature"] == "age")
    assert age["psi"] > 0.2 and age["live_mean"] == pytest.approx(age["ref_mean"] + 15, abs=1)

    # the same output again, from a file whose row 3000 has a non-number: the job fails in a
    # read task mid-run; the error names the file, column and value; the output is untouched
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = rows.astype({"hours_per_week": object})
    bad.loc[3000, "hours_per_week"] = "forty"
    bad.to_csv(src, index=False)
    with pytest.raises(DataValidationError) as e:
        run(make_job(env, src, out, "predict.id_column=customer_id"), log=lambda _: None)
    assert "rows.csv: column 'hours_per_week'" in str(e.value) and "'forty'" in str(e.value)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out / "_temporary").exists()


def test_missing_column_is_named_before_anything_runs(env, tmp_path):
    src = tmp_path / "rows.parquet"
    env["rows"].drop(columns=["age", "occupation"]).to_parquet(src)
    out = tmp_path / "scored"
    r = run_job(["jobs.predict", *job_args(env, src, out)], timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "rows.parquet: required column 'age' is missing" in r.stderr
    assert "rows.parquet: required column 'occupation' is missing" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()

    r = run_job(["jobs.predict", *job_args(env, src.with_name("nope.parquet"), out)], timeout=120)
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_prediction_log_holds_every_scored_row_and_joins_labels(env, tmp_path):
    """predict.prediction_log on: one log row per input row in the online log's schema, the
    job's probabilities and labels, the inputs round-trip (sensitive ones only when allowed); a
    rerun replaces the earlier run's rows, a failed run adds none; labels join as online."""
    rows = env["rows"].iloc[:3000].reset_index(drop=True)
    src = tmp_path / "rows.csv"
    rows.to_csv(src, index=False)
    log = resolve(str(tmp_path / "log"))
    on = ["predict.prediction_log.enabled=true", f"predict.prediction_log.uri={log.uri}",
          "predict.batch_size=700"]

    def score(*extra: str) -> tuple[dict, pd.DataFrame]:
        m = run(make_job(env, src, tmp_path / "scored", *on, *extra), log=lambda _: None)
        got, parts = traffic.read(log, traffic.PREDICTIONS, MODEL)
        assert parts == m["prediction_log"]["parts"]
        for p in parts:  # exactly the online log's schema, no cast needed
            assert pq.read_schema(log.path(p)).remove_metadata() == traffic.PREDICTION_SCHEMA
        return m, got

    first, got = score()
    assert first["prediction_log"]["rows"] == len(got) == len(rows)
    assert list(got.columns) == traffic.PREDICTION_SCHEMA.names
    assert set(got["arm"]) == set(got["endpoint"]) == {"batch"} and set(got["row"]) == {0}
    assert set(got["version"]) == {env["v"].version} and set(got["model"]) == {MODEL}
    assert got["latency_ms"].isna().all() and got["ts"].nunique() == 1
    assert sorted(got["request_id"]) == sorted(f"rows.csv:{i}" for i in range(len(rows)))
    out = pd.read_parquet(tmp_path / "scored" / "predictions")
    out.index = "rows.csv:" + out["source_row"].astype(str)
    got = got.set_index("request_id").loc[out.index]
    np.testing.assert_array_equal(got["probability"].to_numpy(), out["probability"].to_numpy())
    np.testing.assert_array_equal(got["label"].to_numpy(), out["label"].to_numpy())
    # the inputs as the online validator passes them on: numbers as float, categories as
    # strings, missing as null; the sensitive attributes (sex, race) left out by default
    sig = env["predictor"].signature["inputs"]
    want = rows.set_index("rows.csv:" + rows.index.astype(str)).loc[out.index]

    def records(fields: list[dict]) -> list[dict]:
        return [{f["name"]: None if pd.isna(r[f["name"]]) else float(r[f["name"]])
                 if f["kind"] == "numeric" else str(r[f["name"]]) for f in fields}
                for r in want.to_dict("records")]

    plain = [f for f in sig if f.get("role") != "sensitive"]
    assert len(plain) < len(sig) and {f["name"] for f in sig} - {f["name"] for f in plain} \
        == {"sex", "race"}
    assert [json.loads(f) for f in got["features"]] == records(plain)

    second, got = score("predict.prediction_log.log_sensitive=true")
    assert len(got) == len(rows) and second["prediction_log"]["replaced"] == \
        first["prediction_log"]["parts"]  # the same job again: its rows once, not twice
    got = got.set_index("request_id").loc[out.index]
    assert [json.loads(f) for f in got["features"]] == records(sig)  # sensitive ones allowed

    before = {p: p.read_bytes() for p in (tmp_path / "log").rglob("*") if p.is_file()}
    bad = rows.astype({"hours_per_week": object})
    bad.loc[2500, "hours_per_week"] = "forty"
    bad.to_csv(src, index=False)
    with pytest.raises(DataValidationError):
        score()
    assert {p: p.read_bytes() for p in (tmp_path / "log").rglob("*") if p.is_file()} == before

    t = traffic.now()
    labels = traffic.label_table([{"request_id": f"rows.csv:{i}", "labels": [int(y)],
                                   "label_ts": t, "source": "test"}
                                  for i, y in enumerate(rows[env["predictor"].signature["label"]])])
    # (the index took out.index's name: under pandas 2, "source_row")
    joined = traffic.labelled(got.rename_axis("request_id").reset_index(), labels.to_pandas(), t)
    assert len(joined) == len(rows)
    assert (joined["outcome"].to_numpy() == rows[env["predictor"].signature["label"]].to_numpy()[
        joined["request_id"].str.split(":").str[1].astype(int)]).all()


@pytest.mark.s3
def test_s3_registry_input_and_output(ray_2_cpus, moto_s3, bucket, prepared, tmp_path):
    import s3fs
    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3}, skip_instance_cache=True)
    # the registry's artifacts on S3 too: every scoring actor downloads and verifies its copy
    db = f"sqlite:///{tmp_path / 'reg.db'}"
    reg = Registry(db, resolve(f"s3://{bucket}/mlops", moto_s3), Policy.default())
    v = make_version(reg, prepared, 1)
    reg.set_alias(MODEL, "production", v.version, expected=None)
    rows = prepared.frame.iloc[prepared.splits["test"]].reset_index(drop=True).iloc[:3000]
    with s3.open(f"{bucket}/in/rows.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), f, row_group_size=1000)
    run(job("predict", PredictJob, [
        f"ref={MODEL}", f"input=s3://{bucket}/in/", f"output=s3://{bucket}/out", "storage=s3",
        f"storage.uri=s3://{bucket}/mlops", f"storage.endpoint_url={moto_s3}", f"db.url={db}",
        f"ray.address={ray_2_cpus}"]), log=lambda _: None)

    keys = sorted(k.split(f"{bucket}/out/", 1)[1] for k in s3.find(f"{bucket}/out"))
    assert keys == ["_SUCCESS", "drift_report.json", "predictions/part-00000.parquet"]
    with s3.open(f"{bucket}/out/predictions/part-00000.parquet", "rb") as f:
        got = pd.read_parquet(f).sort_values("source_row")
    _, folder = reg.fetch(v.ref)
    np.testing.assert_allclose(got["probability"].to_numpy(),
                               Predictor.load(folder, v.ref).predict_proba(rows), atol=1e-6)
    assert got["source_row"].tolist() == list(range(len(rows)))
    assert json.loads(s3.cat(f"{bucket}/out/_SUCCESS"))["rows_scored"] == len(rows)


def test_workers_stay_far_below_the_tables_memory(env, tmp_path):
    """Adult replicated 50x (2.4 M rows) in a multi-row-group Parquet file, never loaded whole
    (not even here). Each scoring actor reports its memory with every batch: private memory
    (what holding the table would need) and peak RSS, which also counts the pages of Ray's
    shared object store the actor has touched (bounded here by predict.object_store_mb)."""
    base = pd.read_parquet(BUILTIN / "adult.parquet")
    copies = 50
    table = pa.Table.from_pandas(base, preserve_index=False)
    big = tmp_path / "adult_x50.parquet"
    with pq.ParquetWriter(big, table.schema) as w:
        for _ in range(copies):
            w.write_table(table, row_group_size=50_000)
    table_bytes = copies * int(base.memory_usage(deep=True).sum())  # pandas, as loaded whole
    assert pq.ParquetFile(big).metadata.num_row_groups >= 50

    out = tmp_path / "scored"
    m = run(make_job(env, big, out, "predict.object_store_mb=128"), log=lambda _: None)
    assert m["rows_scored"] == copies * len(base)
    assert pq.ParquetFile(out / "predictions" / "part-00000.parquet").metadata.num_rows > 0
    assert len(m["workers"]) >= 1
    for w in m["workers"]:
        private = w["peak_anon"] - w["anon_after_load"]
        total = w["peak_rss"] - w["rss_after_load"]
        mib = 1 << 20
        info = (f"table {table_bytes // mib} MiB; worker {w['id']}: private +{private // mib} "
                f"MiB, RSS +{total // mib} MiB (object store pages {w['peak_shmem'] // mib} MiB)")
        print(info)
        assert private < table_bytes / 4, info
        assert total < table_bytes * 0.75, info
