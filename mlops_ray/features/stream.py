"""Stream ingestion: events on a Redis stream -> the offline parts and the online store.

`publish` XADDs one event per row of a streamed view (`dataset.feast.views[].stream`): fields
`view` and `data` (JSON: the join key, the event time, the view's features). `StreamConsumer`
reads them in a consumer group, and per batch: one Parquet part per view in the view's source
folder (`stream-<first id>-<last id>.parquet`, the base source's schema, `created` = when it was
applied), then a Feast push to the online store, then XACK. features/actor.py runs it in a
detached Ray actor (`jobs.features action=consume`) that Ray restarts if it dies.

Exactly-once effect = at-least-once delivery + idempotent writes:
  * delivery: an event is acknowledged only after both stores hold it. A consumer that dies
    mid-batch restarts under the same name and first re-reads all its own pending entries
    (id "0", no COUNT): one batch is in flight at a time, so that is exactly the
    unacknowledged batch, with the same first and last ids;
  * writes: the part's name comes from those ids and is written under a temporary name, then
    renamed, so a re-applied batch replaces its own part (never a second copy); the online push
    is an upsert of the same value at the same event time.
  tests/integration/test_feature_stream.py kills the consumer between the two writes and checks
  that every event is in the offline store once and the online store holds the latest values.

Online, the latest event time per key wins: within a batch, and across batches by comparing with
the event time the online store holds (to the second). An event older than the stored value
reaches the offline store only, where the point-in-time join orders it. An event that cannot be a
row of its view goes to `<key>:dead` with the reason and is acknowledged. Freshness of an event:
when its batch was acknowledged minus its XADD time (the stream id's milliseconds).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from mlops_ray.config.features import FeastCfg
from mlops_ray.data.featurestore import FeatureRepo

log = logging.getLogger(__name__)
FAULT_ENV = "MLOPS_FEATURES_FAULT"  # tests: crash_after_offline:N (exit 137 after batch N's part)
NAMESPACE = "mlops_ray"  # the project's named actors (serving's hub and rollout runners too)
WINDOW = 10_000  # freshness values kept for the percentiles
Emit = Callable[[str, float, dict[str, str]], None]  # (catalog metric, value, tags)


def client(connection_string: str) -> Any:
    """A redis-py client from the connection string, read by Feast's own parser (the online
    store's grammar: host:port[,db=N,ssl=true,password=...])."""
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore
    nodes, params = RedisOnlineStore._parse_connection_string(connection_string)
    return redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **params,
                       decode_responses=True)


def _view(cfg: FeastCfg, name: str) -> Any:
    views = {v.name: v for v in cfg.views}
    if name not in views:
        raise ValueError(f"view '{name}': not a view of dataset.feast.views ({sorted(views)})")
    if not views[name].stream:
        raise ValueError(f"view '{name}': not a streamed view (dataset.feast.views[].stream: "
                         f"false); streamed: {[v.name for v in cfg.views if v.stream]}")
    return views[name]


def _iso(value: Any, field: str) -> str:
    """An event time as ISO 8601 in UTC (a naive time is taken as UTC; a number as epoch s)."""
    import pandas as pd
    try:
        t = (pd.Timestamp(value, unit="s") if isinstance(value, int | float)
             else pd.Timestamp(value))
    except (ValueError, TypeError):
        raise ValueError(f"{field}: {value!r} is not a time") from None
    if pd.isna(t):
        raise ValueError(f"{field}: {value!r} is not a time")
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return str(t.isoformat())


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else str(v)  # numpy scalars; anything else as text


def encode(cfg: FeastCfg, view: str, row: dict[str, Any]) -> dict[str, str]:
    """The stream fields of one event; ValueError naming the field that is wrong."""
    v = _view(cfg, view)
    for f in (cfg.join_key, *v.features):
        if f not in row:
            raise ValueError(f"event of view '{view}': field '{f}' missing (an event carries "
                             f"'{cfg.join_key}', '{cfg.timestamp_field}' and {v.features})")
    allowed = {cfg.join_key, cfg.timestamp_field, *v.features}
    extra = sorted(set(row) - allowed)
    if extra:
        raise ValueError(f"event of view '{view}': field(s) {extra} not in the view (the "
                         f"consumer sets '{cfg.created_timestamp_field}')")
    data = {k: row[k] for k in (cfg.join_key, *v.features)}
    data[cfg.timestamp_field] = _iso(row.get(cfg.timestamp_field, datetime.now(timezone.utc)),
                                     cfg.timestamp_field)
    return {"view": view, "data": json.dumps(data, default=_plain)}


def publish(cfg: FeastCfg, view: str, rows: list[dict[str, Any]], r: Any = None) -> list[str]:
    """XADD one event per row (the event time defaults to now); returns the stream ids."""
    events = [encode(cfg, view, row) for row in rows]  # all valid before any is sent
    r = r if r is not None else client(cfg.stream.redis_connection())
    pipe = r.pipeline(transaction=False)
    for e in events:
        pipe.xadd(cfg.stream_key(), e)
    return [str(i) for i in pipe.execute()]


def id_ms(stream_id: str) -> int:
    return int(stream_id.split("-", 1)[0])


def _fault() -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, n = spec.partition(":")
    return int(n) if kind == "crash_after_offline" and n.isdigit() else None


class StreamConsumer:
    """One consumer of the group (`dataset.feast.stream`). `emit`: a metrics sink (the Ray
    actor passes the catalog's metrics; without it nothing needs Ray)."""

    def __init__(self, cfg: FeastCfg, storage_uri: str = "outputs", emit: Emit | None = None,
                 redis_client: Any = None):
        self.cfg, self.emit = cfg, emit
        self.repo = FeatureRepo(cfg, storage_uri)
        if not self.repo.applied():  # (the driver checked the sources: start_consumer)
            self.repo.apply()
        self.key, s = cfg.stream_key(), cfg.stream
        self.group, self.name, self.count, self.block = s.group, s.consumer, s.batch, s.block_ms
        self.r = redis_client if redis_client is not None else client(s.redis_connection())
        self.views = {v.name: v for v in cfg.views if v.stream}
        self.schemas = {v: self._base_schema(v) for v in self.views}
        self.applied = self.batches = self.dead = 0
        self.parts: dict[str, int] = defaultdict(int)  # parts written since the last compaction
        self.freshness: deque[float] = deque(maxlen=WINDOW)
        self.last_freshness: float | None = None
        self.fault = _fault()
        self._lock = threading.Lock()
        import redis
        try:
            self.r.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _base_schema(self, view: str) -> Any:
        import pyarrow.parquet as pq
        return pq.read_schema(self.repo.view_dir(view) / "base.parquet")

    # ------------------------------------------------------------------ the loop
    def read(self) -> list[tuple[str, dict[str, str]]]:
        """Its own pending entries first (after a restart: the unacknowledged batch), else new
        ones."""
        # every pending entry, whatever `batch` is now: a batch size changed between a crash and
        # the restart still re-reads exactly the unacknowledged batch (and rewrites its part)
        for start, count, block in (("0", None, None), (">", self.count, self.block)):
            got = self.r.xreadgroup(self.group, self.name, {self.key: start}, count=count,
                                    block=block)
            entries = [(i, f) for _, batch in (got or []) for i, f in batch if f]
            if entries:
                return entries
        return []

    def step(self) -> int:
        """Read one batch, write it to both stores, acknowledge it; the events applied."""
        entries = self.read()
        if not entries:
            self._emit_lag()
            return 0
        per_view: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        bad = []
        for sid, f in entries:
            if f.get("view") in self.views:
                per_view[f["view"]].append((sid, json.loads(f["data"])))
            else:  # not ours to apply (a view since removed): acknowledged, logged
                bad.append(sid)
        if bad:
            log.warning("stream %s: %d event(s) of unknown views skipped (%s..)", self.key,
                        len(bad), bad[0])
        created = datetime.now(timezone.utc)
        tables = {}
        for v in list(per_view):
            try:
                tables[v] = self._table(v, [d for _, d in per_view[v]], created)
            except Exception:  # noqa: BLE001 - find the bad events; the rest go on
                per_view[v] = self._dead_letters(v, per_view[v], created)
                if per_view[v]:
                    tables[v] = self._table(v, [d for _, d in per_view[v]], created)
                else:
                    del per_view[v]
        for v, evs in per_view.items():
            self._write_part(v, evs[0][0], evs[-1][0], tables[v])
        self.batches += 1
        if self.fault is not None and self.batches == self.fault:
            os._exit(137)  # the test's crash: offline part written, not pushed, not acked
        from feast.data_source import PushMode
        for v, table in tables.items():
            df = self._newer(v, self._latest(table.to_pandas()))
            if len(df):
                self.repo.store.push(f"{v}_push", df, to=PushMode.ONLINE)
        self.r.xack(self.key, self.group, *[sid for sid, _ in entries])
        if self.cfg.stream.trim:  # everything up to this batch is in both stores
            self.r.xtrim(self.key, minid=entries[-1][0], approximate=True)
        every = self.cfg.stream.compact_every
        for v in per_view:  # every part up to this acknowledged batch: none re-applied later
            self.parts[v] += 1
            if every and self.parts[v] >= every:
                self.repo.compact(v, upto=entries[-1][0])
                self.parts[v] = 0
        done, n = time.time(), sum(len(e) for e in per_view.values())
        with self._lock:
            for v, evs in per_view.items():
                fresh = [done - id_ms(sid) / 1000 for sid, _ in evs]
                self.freshness.extend(fresh)
                self.last_freshness = fresh[-1]
                if self.emit:
                    tags = {"project": self.cfg.project, "view": v}
                    self.emit("mlops_features_events", float(len(evs)), tags)
                    for x in fresh:
                        self.emit("mlops_features_freshness_seconds", x, tags)
            self.applied += n
        self._emit_lag()
        return n

    def run(self, stop_event: threading.Event | None = None, max_events: int | None = None,
            drain: bool = False) -> int:
        """step() until `stop_event` is set, `max_events` are applied, or (`drain`) a read
        finds nothing; returns the events applied."""
        n = 0
        while not (stop_event and stop_event.is_set()):
            got = self.step()
            n += got
            if (max_events is not None and n >= max_events) or (drain and not got):
                break
        return n

    # ------------------------------------------------------------------ the writes
    def _table(self, view: str, rows: list[dict[str, Any]], created: datetime) -> Any:
        """The batch's rows of one view in its base source's schema (columns, Arrow types)."""
        import pandas as pd
        import pyarrow as pa
        c, schema = self.cfg, self.schemas[view]
        cols = []
        for field in schema:
            if field.name == c.created_timestamp_field:
                vals: list[Any] = [created] * len(rows)
            elif field.name == c.timestamp_field:
                vals = [pd.Timestamp(r[field.name]).to_pydatetime() for r in rows]
            else:
                vals = [r.get(field.name) for r in rows]
            try:
                cols.append(pa.array(vals, type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                cols.append(pa.array(vals).cast(field.type))
        return pa.Table.from_arrays(cols, schema=schema)

    def _write_part(self, view: str, first: str, last: str, table: Any) -> None:
        # a re-applied batch replaces its own part
        self.repo.write_table(view, f"stream-{first}-{last}.parquet", table)

    def _dead_letters(self, view: str, events: list[tuple[str, dict[str, Any]]],
                      created: datetime) -> list[tuple[str, dict[str, Any]]]:
        """Events that cannot become a row of the view (a value of the wrong type, no event
        time) go to the stream `<key>:dead` with the reason, and are acknowledged with the
        batch: one bad event never stops the stream. Returns the good ones."""
        good = []
        for sid, d in events:
            try:
                self._table(view, [d], created)
                good.append((sid, d))
            except Exception as e:  # noqa: BLE001 - the reason travels with the event
                self.dead += 1
                self.r.xadd(f"{self.key}:dead", {"id": sid, "view": view,
                                                  "data": json.dumps(d, default=str),
                                                  "error": f"{type(e).__name__}: {e}"[:500]})
                log.warning("stream %s: event %s of view %s moved to %s:dead (%s)", self.key,
                            sid, view, self.key, e)
        return good

    def _newer(self, view: str, df: Any) -> Any:
        """The rows at least as new as what the online store holds (by event time, to the
        second: Feast keeps seconds): an event that arrives after a newer one of the same key
        updates the offline store only, as the point-in-time join orders them."""
        import numpy as np
        c, f0 = self.cfg, self.views[view].features[0]
        got = self.repo.store.get_online_features(
            [f"{view}:{f0}"], [{c.join_key: k} for k in df[c.join_key].tolist()]
        ).to_dict(include_event_timestamps=True)
        stored = np.array([t or 0 for t in got.get(f"{f0}__ts", [0] * len(df))], dtype=np.int64)
        new = np.array([int(t.timestamp()) for t in df[c.timestamp_field]], dtype=np.int64)
        return df[new >= stored]

    def _latest(self, df: Any) -> Any:
        """The latest event per key (event time, then stream order): what online should hold."""
        c = self.cfg
        df = df.reset_index(drop=True)
        df["_order"] = range(len(df))
        df = df.sort_values([c.timestamp_field, "_order"], kind="stable")
        return df.drop_duplicates(c.join_key, keep="last").drop(columns="_order")

    # ------------------------------------------------------------------ state
    def lag_s(self) -> float:
        """Age of the oldest event not yet applied (0 when caught up)."""
        oldest = None
        pend = self.r.xpending(self.key, self.group)
        if pend and pend.get("pending"):
            oldest = str(pend["min"])
        else:
            groups = {g["name"]: g for g in self.r.xinfo_groups(self.key)}
            last = groups.get(self.group, {}).get("last-delivered-id", "0-0")
            nxt = self.r.xrange(self.key, min=f"({last}", count=1)
            oldest = nxt[0][0] if nxt else None
        return 0.0 if oldest is None else max(0.0, time.time() - id_ms(oldest) / 1000)

    def _emit_lag(self) -> None:
        if self.emit:
            self.emit("mlops_features_lag_seconds", self.lag_s(), {"project": self.cfg.project})

    def status(self) -> dict[str, Any]:
        import numpy as np
        with self._lock:
            f = list(self.freshness)
            out = {"applied": self.applied, "batches": self.batches, "dead_letters": self.dead,
                   "last_freshness_s": self.last_freshness,
                   "p50_freshness_s": float(np.percentile(f, 50)) if f else None,
                   "p99_freshness_s": float(np.percentile(f, 99)) if f else None,
                   "window": len(f)}
        return {**out, "stream": self.key, "group": self.group, "consumer": self.name}


# ---------------------------------------------------------------------- a process (tests, bench)
def main(argv: list[str]) -> int:
    """python -m mlops_ray.features.stream FEAST_JSON STORAGE_URI [--max-events N] [--drain]"""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mlops_ray.features.stream",
                                 description=main.__doc__)
    ap.add_argument("config", help="a JSON file: the dataset.feast section")
    ap.add_argument("storage_uri")
    ap.add_argument("--max-events", type=int, default=None)
    ap.add_argument("--drain", action="store_true", help="stop when a read finds nothing")
    a = ap.parse_args(argv)
    with open(a.config) as fh:
        cfg = FeastCfg.model_validate(json.load(fh))
    c = StreamConsumer(cfg, a.storage_uri)
    c.run(max_events=a.max_events, drain=a.drain)
    print(json.dumps(c.status()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
