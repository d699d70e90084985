"""Stream ingestion (mlops_ray/features/stream.py) against a real redis-server on 127.0.0.1: events
published to the stream reach the offline parts and the online store; a consumer killed between
its two writes loses none and duplicates none; the point-in-time join sees streamed values only
once they were known; the consumer as a Ray actor survives being killed."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlops_ray.config.features import FeastCfg
from mlops_ray.data.featurestore import FeatureRepo
from mlops_ray.features import actor as ray_consumer
from mlops_ray.features import stream
from tests.conftest import REPO, job_env, wait_until

pytestmark = pytest.mark.server
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)  # the base sources' event (and created) time
T1 = datetime(2024, 6, 1, tzinfo=timezone.utc)  # streamed events from here, a minute apart
KEYS = [1, 2, 3, 4, 5]


def _sources(folder: Path) -> tuple[Path, Path]:
    ts = pa.timestamp("us", tz="UTC")
    n = len(KEYS)
    work, profile = folder / "work.parquet", folder / "profile.parquet"
    pq.write_table(pa.table({
        "uid": pa.array(KEYS, pa.int64()), "event_timestamp": pa.array([T0] * n, ts),
        "created": pa.array([T0] * n, ts), "score": pa.array([-1.0] * n, pa.float64()),
        "level": pa.array(["base"] * n), "visits": pa.array([0] * n, pa.int64())}), work)
    pq.write_table(pa.table({
        "uid": pa.array(KEYS, pa.int64()), "event_timestamp": pa.array([T0] * n, ts),
        "created": pa.array([T0] * n, ts), "age": pa.array([30 + k for k in KEYS], pa.int64())}),
        profile)
    return work, profile


@pytest.fixture
def feast(tmp_path, redis_server) -> FeastCfg:
    """A small two-view store (one streamed) in tmp_path, applied; its own stream key."""
    work, profile = _sources(tmp_path)
    cfg = FeastCfg.model_validate({
        "project": "streamtest", "join_key": "uid",
        "views": [{"name": "work", "source": str(work), "stream": True,
                   "features": ["score", "level", "visits"]},
                  {"name": "profile", "source": str(profile), "features": ["age"]}],
        "stream": {"connection_string": f"127.0.0.1:{redis_server}",
                   "key": f"features:test-{secrets.token_hex(4)}", "batch": 4, "block_ms": 50},
        "path": str(tmp_path / "store")})
    FeatureRepo(cfg, str(tmp_path)).apply()
    return cfg


def _events(n: int, start: int = 0) -> list[dict]:
    """Event i: key KEYS[i % 5], event time T1 + i min, score i: the latest per key is known."""
    return [{"uid": KEYS[i % len(KEYS)], "event_timestamp": T1 + timedelta(minutes=i),
             "score": float(i), "level": f"l{i}", "visits": i} for i in range(start, start + n)]


def _latest(events: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for e in sorted(events, key=lambda e: e["event_timestamp"]):
        out[e["uid"]] = e
    return out


def _parts(cfg: FeastCfg, storage: Path) -> dict[str, pa.Table]:
    folder = FeatureRepo(cfg, str(storage)).view_dir("work")
    return {p.name: pq.read_table(p) for p in sorted(folder.glob("stream-*.parquet"))}


def _offline_rows(cfg: FeastCfg, storage: Path) -> pd.DataFrame:
    parts = _parts(cfg, storage)
    return pd.concat([t.to_pandas() for t in parts.values()], ignore_index=True) if parts \
        else pd.DataFrame()


def _pending(cfg: FeastCfg) -> int:
    r = stream.client(cfg.stream.connection_string)
    return int(r.xpending(cfg.stream_key(), cfg.stream.group)["pending"])


def _consumer(config: Path, storage: Path, *args: str, **env: str | None
              ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlops_ray.features.stream", str(config),
                           str(storage), *args], cwd=REPO, env=job_env(**env),
                          capture_output=True, text=True, timeout=300)


def test_killed_between_the_writes_loses_none_and_duplicates_none(feast, tmp_path):
    n, batch = 18, feast.stream.batch  # 5 batches: 4 4 4 4 2
    events = _events(n)
    ids = stream.publish(feast, "work", events)
    assert len(ids) == n
    config = tmp_path / "feast.json"
    config.write_text(json.dumps(feast.plain()))

    # batch 2's part is written, then the process dies before the online push and the ack
    crashed = _consumer(config, tmp_path, "--drain",
                        MLOPS_FEATURES_FAULT="crash_after_offline:2")
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    before = _parts(feast, tmp_path)
    assert sorted(before) == sorted([f"stream-{ids[0]}-{ids[batch - 1]}.parquet",
                                     f"stream-{ids[batch]}-{ids[2 * batch - 1]}.parquet"])
    assert _pending(feast) == batch  # batch 2: delivered, never acknowledged

    done = _consumer(config, tmp_path, "--drain", MLOPS_FEATURES_FAULT=None)
    assert done.returncode == 0, done.stdout + done.stderr
    # the restart re-applied batch 2 (the same part, replaced) and then the rest
    assert json.loads(done.stdout.strip().splitlines()[-1])["applied"] == n - batch
    parts = _parts(feast, tmp_path)
    assert set(before) <= set(parts) and len(parts) == -(-n // batch)
    base = pq.read_schema(FeatureRepo(feast, str(tmp_path)).view_dir("work") / "base.parquet")
    assert all(t.schema.equals(base) for t in parts.values())
    rows = _offline_rows(feast, tmp_path)
    assert len(rows) == n, "every event once in the offline store"
    assert not rows.duplicated(["uid", "event_timestamp"]).any()
    assert sorted(rows["score"]) == [float(i) for i in range(n)]
    assert _pending(feast) == 0

    repo = FeatureRepo(feast, str(tmp_path))
    online = repo.online(KEYS, ["score", "level", "visits"])
    latest = _latest(events)
    assert online["score"] == [latest[k]["score"] for k in KEYS]
    assert online["level"] == [latest[k]["level"] for k in KEYS]
    assert online["visits"] == [latest[k]["visits"] for k in KEYS]

    # point in time: a row after the events and after they were applied sees the streamed
    # values; a row after the events' event times but before they reached the store (created)
    # sees the base values only
    applied_at = rows["created"].max()
    entity = pd.DataFrame({"uid": KEYS + KEYS,
                           "event_timestamp": [applied_at + pd.Timedelta(minutes=1)] * 5
                           + [pd.Timestamp(T1 + timedelta(days=30))] * 5,
                           "label": [0] * 10})
    assert entity["event_timestamp"].iloc[5] < applied_at  # the test's premise
    frame = repo.training_frame(entity)
    assert list(frame["score"][:5]) == [latest[k]["score"] for k in KEYS]
    assert list(frame["score"][5:]) == [-1.0] * 5
    assert list(frame["age"]) == [30 + k for k in KEYS] * 2


def test_an_applied_event_is_online_when_step_returns(feast, tmp_path):
    seen: list[tuple[str, float, dict]] = []
    consumer = stream.StreamConsumer(feast, str(tmp_path),
                                     emit=lambda n, v, t: seen.append((n, v, t)))
    events = _events(3, start=100)
    ids = stream.publish(feast, "work", events)
    assert consumer.lag_s() > 0  # published, not applied
    before = time.time()
    assert consumer.step() == 3
    after = time.time()
    online = FeatureRepo(feast, str(tmp_path)).online([e["uid"] for e in events], ["score"])
    assert online["score"] == [e["score"] for e in events]
    st = consumer.status()
    # freshness = acknowledged - XADD time (the id's ms), computed per event
    oldest = stream.id_ms(ids[0]) / 1000
    assert st["applied"] == 3 and st["window"] == 3
    assert 0 < st["last_freshness_s"] <= after - oldest + 0.002
    assert st["p99_freshness_s"] >= st["p50_freshness_s"] > 0
    assert st["p99_freshness_s"] >= before - stream.id_ms(ids[-1]) / 1000 - 0.002
    tags = {"project": "streamtest", "view": "work"}
    assert ("mlops_features_events", 3.0, tags) in seen
    assert len([s for s in seen if s[0] == "mlops_features_freshness_seconds"]) == 3
    assert seen[-1] == ("mlops_features_lag_seconds", 0.0, {"project": "streamtest"})
    assert consumer.step() == 0  # nothing new: an empty read returns, it does not hang


def test_publish_refuses_what_no_view_holds(feast):
    good = _events(1)[0]
    with pytest.raises(ValueError, match="'nope'"):
        stream.publish(feast, "nope", [good])
    with pytest.raises(ValueError, match="'profile': not a streamed view"):
        stream.publish(feast, "profile", [{"uid": 1, "age": 3}])
    with pytest.raises(ValueError, match="'uid' missing"):
        stream.publish(feast, "work", [{k: v for k, v in good.items() if k != "uid"}])
    with pytest.raises(ValueError, match="'level' missing"):
        stream.publish(feast, "work", [{k: v for k, v in good.items() if k != "level"}])
    with pytest.raises(ValueError, match="'created'"):
        stream.publish(feast, "work", [{**good, "created": T1}])
    with pytest.raises(ValueError, match="event_timestamp: 'soon' is not a time"):
        stream.publish(feast, "work", [{**good, "event_timestamp": "soon"}])
    # nothing of a refused call reached the stream, even its valid rows
    with pytest.raises(ValueError):
        stream.publish(feast, "work", [good, {"uid": 2}])
    assert stream.client(feast.stream.connection_string).xlen(feast.stream_key()) == 0


@pytest.mark.ray
def test_the_consumer_actor_survives_a_kill(feast, tmp_path, ray_2_cpus):
    """jobs.features action=consume / stop on the session's Ray: one detached actor per project,
    restarted by Ray after a kill, resuming where the killed one stopped."""
    import ray

    from mlops_ray.config.compose import job
    from mlops_ray.config.train import FeaturesJob
    fj = job("features", FeaturesJob, ["+experiment=adult_people_mlp", "action=consume",
                                       f"storage.uri={tmp_path}"])
    fj = fj.model_copy(update={"dataset": fj.dataset.model_copy(update={"feast": feast})})
    started = ray_consumer.start_consumer(fj)
    assert started["actor"] == "features-consumer-streamtest" and started["running"]
    assert ray_consumer.start_consumer(fj)["pid"] == started["pid"]  # running: its status, no second
    actor = ray.get_actor(started["actor"], namespace=stream.NAMESPACE)

    def status() -> dict | None:
        try:
            return ray.get(actor.status.remote(), timeout=30)
        except ray.exceptions.RayError:
            return None  # restarting
    try:
        first = _events(6)
        stream.publish(feast, "work", first)
        st = wait_until(lambda: (s := status()) and s["applied"] == 6 and s, 180,
                        what="the actor applying 6 events")
        assert st["running"] and st["error"] is None and st["lag_s"] == 0
        ray.kill(actor, no_restart=False)
        # the new events only once the killed actor is gone and its successor runs (the dying
        # one cannot apply any of them)
        wait_until(lambda: (s := status()) and s["pid"] != st["pid"], 180,
                   what="Ray restarting the killed actor")
        rest = _events(5, start=6)
        stream.publish(feast, "work", rest)
        st2 = wait_until(lambda: (s := status()) and s["applied"] == 5 and s, 180,
                         what="the restarted actor applying the 5 new events")
        assert st2["error"] is None
        rows = _offline_rows(feast, tmp_path)
        assert len(rows) == 11 and not rows.duplicated(["uid", "event_timestamp"]).any()
        assert _pending(feast) == 0
        online = FeatureRepo(feast, str(tmp_path)).online(KEYS, ["score"])
        assert online["score"] == [_latest(first + rest)[k]["score"] for k in KEYS]
        stopped = ray_consumer.stop_consumer(fj)
        assert stopped["stopped"] and stopped["last_status"]["applied"] == 5

        def gone() -> bool:
            try:
                ray.get_actor(started["actor"], namespace=stream.NAMESPACE)
                return False
            except ValueError:
                return True
        wait_until(gone, 60, what="the stopped actor's name released")
        assert ray_consumer.stop_consumer(fj)["stopped"] is False
    finally:
        try:
            ray.kill(ray.get_actor(started["actor"], namespace=stream.NAMESPACE),
                     no_restart=True)
        except ValueError:
            pass


def test_compaction_on_a_busy_stream_keeps_every_event_once_across_a_crash(feast, tmp_path):
    """compact_every=2: the consumer merges its acknowledged parts as it goes; killed after
    batch 3's part (batches 1-2 already merged), restarted: every event once, few files."""
    feast = feast.model_copy(update={"stream": feast.stream.model_copy(
        update={"compact_every": 2})})
    n = 18
    stream.publish(feast, "work", _events(n))
    config = tmp_path / "feast.json"
    config.write_text(json.dumps(feast.plain()))
    crashed = _consumer(config, tmp_path, "--drain", MLOPS_FEATURES_FAULT="crash_after_offline:3")
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    folder = FeatureRepo(feast, str(tmp_path)).view_dir("work")
    assert [p.name.split("-")[0] for p in sorted(folder.glob("*-*.parquet"))] == [
        "compacted", "stream"]  # batches 1-2 merged; batch 3's part, never acknowledged
    done = _consumer(config, tmp_path, "--drain", MLOPS_FEATURES_FAULT=None)
    assert done.returncode == 0, done.stdout + done.stderr
    files = [p for p in folder.glob("*.parquet") if p.name != "base.parquet"]
    rows = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
    assert sorted(rows["score"]) == [float(i) for i in range(n)]  # every event, once
    assert len(files) <= 3 and _pending(feast) == 0


def test_bad_events_go_to_the_dead_letter_stream_and_old_events_stay_offline(feast, tmp_path):
    """A value of the wrong type and an event without a time cannot become rows: they go to
    `<key>:dead` with the reason, the rest of their batch is applied, nothing stays pending.
    An event older than what the online store holds updates the offline store only."""
    consumer = stream.StreamConsumer(feast, str(tmp_path))
    r = stream.client(feast.stream.connection_string)
    new = _events(1, start=50)[0]  # key KEYS[0], 50 minutes after T1
    stream.publish(feast, "work", [new])
    assert consumer.step() == 1
    old = {**new, "event_timestamp": T1, "score": -5.0}  # same key, 50 minutes earlier
    stream.publish(feast, "work", [old])
    r.xadd(feast.stream_key(), {"view": "work", "data": json.dumps(
        {"uid": 2, "event_timestamp": T1.isoformat(), "score": "high", "level": "x",
         "visits": 1})})
    r.xadd(feast.stream_key(), {"view": "work", "data": json.dumps(
        {"uid": 3, "score": 1.0, "level": "x", "visits": 1})})
    good = _events(1, start=60)[0] | {"uid": 4}
    stream.publish(feast, "work", [good])
    assert consumer.step() == 2  # the old one and the good one
    dead = r.xrange(f"{feast.stream_key()}:dead")
    assert [json.loads(f["data"])["uid"] for _, f in dead] == [2, 3]
    assert all(f["error"] for _, f in dead) and consumer.status()["dead_letters"] == 2
    assert _pending(feast) == 0
    online = FeatureRepo(feast, str(tmp_path)).online([KEYS[0], 4], ["score"])
    assert online["score"] == [new["score"], good["score"]]  # the older event did not win
    rows = _offline_rows(feast, tmp_path)
    assert sorted(rows["score"]) == sorted([new["score"], -5.0, good["score"]])
