"""The prediction log on a running Serve app (#18): one row per answered record under
concurrent load and none for a 4xx, the timer and drain flushes, late labels through /feedback,
and what killing an ingress replica loses. Real HTTP on 127.0.0.1, real Parquet files."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import requests

from mlops_ray.data import traffic
from mlops_ray.registry import Policy, Registry
from mlops_ray.serving import control, rollout
from mlops_ray.storage import resolve
from tests.conftest import dataset, free_port, wait_until
from tests.integration.test_serve import post, serve_job
from tests.serving import MODEL, make_version

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def env(ray_2_cpus, tmp_path_factory):
    from ray import serve

    from mlops_ray.data import prepare
    store = tmp_path_factory.mktemp("predlog")
    overrides = [f"ref={MODEL}", f"storage.uri={store}", f"db.url=sqlite:///{store / 'reg.db'}",
                 f"serve.port={free_port()}", f"ray.address={ray_2_cpus}",
                 "serve.cache.enabled=false",  # every answer computed (a cached one is logged too)
                 "serve.prediction_log.log_sensitive=true"]
    reg = Registry(f"sqlite:///{store / 'reg.db'}", resolve(str(store)), Policy.default())
    prepared = prepare(dataset("adult_mlp"), 0)
    v = make_version(reg, prepared, 0)
    reg.set_alias(MODEL, "production", v.version, expected=None)
    control.start(serve_job(overrides))
    rows = prepared.frame.iloc[prepared.splits["test"]]
    cols = [f["name"] for f in json.loads(
        (Path(v.artifact_uri.removeprefix("file://")) / "signature.json").read_text())["inputs"]]
    yield {"overrides": overrides, "reg": reg, "store": store, "version": v,
           "records": json.loads(rows[cols].to_json(orient="records")), "rows": rows,
           "prepared": prepared}
    serve.shutdown()


def app(env, name: str, *settings: str):
    """A fresh app `name` whose log lives in its own folder; (job, direct URL, log storage)."""
    job = serve_job([*env["overrides"], f"serve.app_name={name}", f"serve.route_prefix=/{name}",
                     f"serve.prediction_log.uri={env['store'] / name}", *settings])
    rollout.serve_alias(job, env["reg"], "production", log=lambda _: None)
    return job, control.direct_endpoint(job), resolve(str(env["store"] / name))


def logged(store) -> list[tuple[str, int]]:
    df, _ = traffic.read(store, traffic.PREDICTIONS, MODEL)
    return list(zip(df["request_id"], df["row"]))


def test_exactly_one_row_per_answer_under_load_and_none_for_a_4xx(env):
    """2,000 requests from 16 concurrent clients, every 10th one invalid (422): the log holds
    exactly one row per answered record, found by the timer flush, and the drain flush when
    the app is deleted adds nothing twice."""
    from ray import serve
    job, url, store = app(env, "plog", "serve.prediction_log.flush_interval_s=0.5")
    recs, answered, refused, lock = env["records"], {}, [], threading.Lock()

    def client(k: int) -> None:
        s = requests.Session()
        for i in range(k, 2000, 16):
            body = {"records": [recs[i]]} if i % 10 else {"records": [{**recs[i], "age": "x"}]}
            r = s.post(url + "/predict", json=body, timeout=60)
            with lock:
                if r.status_code == 200:
                    answered[r.json()["request_id"]] = (i, r.json()["probabilities"][0])
                else:
                    refused.append(r.status_code)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(answered) == 1800 and refused == [422] * 200
        wait_until(lambda: len(logged(store)) >= 1800, 60, what="the timer flushes")
    finally:
        serve.delete("plog")  # drains the replica: its last buffer is written
    df, _ = traffic.read(store, traffic.PREDICTIONS, MODEL)
    assert sorted(df["request_id"]) == sorted(answered)  # one row each, no 4xx, no duplicate
    assert (df["row"] == 0).all() and set(df["version"]) == {env["version"].version}
    first = df.iloc[0]
    i, p = answered[first["request_id"]]
    assert first["probability"] == pytest.approx(p)
    assert json.loads(first["features"])["age"] == recs[i]["age"]
    assert (df["endpoint"] == "predict").all() and (df["arm"] == "stable").all()


def test_drain_writes_the_buffer_and_feedback_lands_in_the_label_log(env):
    """A flush window longer than the test: only the drain (serve.delete) writes the rows; the
    labels posted to /feedback are in the label log, joined to their requests by id."""
    from ray import serve
    job, url, store = app(env, "plogdrain", "serve.prediction_log.flush_interval_s=3600")
    rows = env["rows"].iloc[:40]
    labels = env["prepared"].labels(rows).astype(int).tolist()
    ids = []
    for i in range(0, 40, 4):
        a = post(url + "/predict", {"records": env["records"][i:i + 4]}).json()
        ids.append(a["request_id"])
        ok = post(url + "/feedback", {"request_id": a["request_id"], "labels": labels[i:i + 4]})
        assert ok.status_code == 200, ok.text
    assert logged(store) == []  # nothing written yet: the window is an hour
    serve.delete("plogdrain")
    assert sorted(logged(store)) == sorted((r, k) for r in ids for k in range(4))
    preds, _ = traffic.read(store, traffic.PREDICTIONS, MODEL)
    labs, _ = traffic.read(store, traffic.LABELS, MODEL)
    joined = traffic.labelled(preds, labs, traffic.now())
    assert len(joined) == 40
    by_id = {(r, k): y for r, k, y in zip(joined["request_id"], joined["row"], joined["outcome"])}
    assert [by_id[(ids[i // 4], i % 4)] for i in range(40)] == labels
    assert "sex" in json.loads(preds["features"].iloc[0])  # log_sensitive=true in this module


def test_a_killed_ingress_replica_loses_at_most_one_flush_window(env):
    """flush_rows=50, no timer: 230 answers, and the writer settles with fewer than 50 rows
    unwritten (no write in flight). The replica is then killed (no drain): what is lost is that
    open window, the latest answers, and no more; the replica Serve starts instead logs the
    next answers."""
    import ray
    from ray import serve
    job, url, store = app(env, "plogkill", "serve.prediction_log.flush_interval_s=3600",
                          "serve.prediction_log.flush_rows=50")
    answered = []
    try:
        for rec in env["records"][:230]:
            r = post(url + "/predict", {"records": [rec]})
            assert r.status_code == 200, r.text
            answered.append(r.json()["request_id"])
        # a write in flight holds >= 50 rows: fewer than 50 unwritten means none is
        before = wait_until(lambda: (n := len(logged(store))) > 230 - 50 and n, 60,
                            what="the full windows written")
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::plogkill#Ingress#"))
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        new = wait_until(lambda: [u for u in control.direct_endpoints(job, timeout=1)
                                  if u != url], 120, what="the replacement replica")
        ids = [r for r, _ in logged(store)]
        lost = [r for r in answered if r not in set(ids)]
        assert len(ids) == before and len(set(ids)) == len(ids) and set(ids) <= set(answered)
        assert len(lost) < 50 and lost == answered[len(answered) - len(lost):]
        more = []
        for rec in env["records"][230:280]:
            r = post(new[0] + "/predict", {"records": [rec]})
            assert r.status_code == 200, r.text
            more.append(r.json()["request_id"])
        wait_until(lambda: len(logged(store)) == before + 50, 60,
                   what="the new replica's first window")
        assert {r for r, _ in logged(store)} == set(ids) | set(more)
    finally:
        serve.delete("plogkill")
