"""Entity-keyed requests: the ingress looks a record's features up in the online store.

A version trained on `dataset.feast` carries `signature.json["entity"]` (written at promotion):
the join key, the features the signature needs and where the store is. A record that holds only
the join key gets those features from the online store, then the usual validation and the
registered decision rule (the same preprocessing as in training) apply. So the online vector
and the offline point-in-time vector go through one code path (tests/…/test_features_*: skew).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlops_ray.config.features import FeastCfg
from mlops_ray.data.featurestore import FeatureRepo
from mlops_ray.errors import RequestInvalid

INT64 = (-(2**63), 2**63 - 1)


def entity_spec(feast: dict[str, Any], store: str, inputs: list[str],
                key_type: str = "int64") -> dict[str, Any]:
    """signature.json's "entity" section: what serving looks up (the join key and its type:
    "int64" or "string"), for which inputs, from which store."""
    cfg = FeastCfg.model_validate(feast)
    have = cfg.columns()
    return {"join_key": cfg.join_key, "key_type": key_type,
            "features": [f for f in inputs if f in have],
            "on_missing": cfg.on_missing, "store": store, "feast": cfg.plain()}


class OnlineLookup:
    """One per ingress replica. Feast's online read is blocking: it runs on its own thread so
    the replica's event loop keeps serving, one read at a time (concurrent requests share it)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        cfg = FeastCfg.model_validate({**spec["feast"], "path": spec["store"]})
        self.repo = FeatureRepo(cfg)
        self.key = spec["join_key"]
        self.key_type = spec.get("key_type", "int64")
        if not (Path(spec["store"]) / "registry.db").exists():
            raise FileNotFoundError(
                f"signature.entity.store='{spec['store']}': no feature store there (its "
                "registry.db); serve where the store's folder is, or run jobs.features "
                "action=apply with the same dataset.feast.path")
        self.features: list[str] = list(spec["features"])
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online-features")
        self.waiting: list[tuple[list[Any], asyncio.Future]] = []
        self.timeout_s = 5.0  # an online store that hangs: 503, not a request that never ends
        self.reader: asyncio.Task | None = None

    def open(self) -> None:
        """Pay the store's fixed costs now (Feast's import, its registry, the online store's
        first connection): a version loads with its store ready, and the request timeout
        below bounds reads only. One read of a key nobody has does all of it."""
        self.fetch([-1 if self.key_type == "int64" else ""])

    def keys(self, records: Any, max_rows: int) -> list[Any]:
        if not isinstance(records, list) or not records:
            raise RequestInvalid(["records: must be a non-empty list of objects"])
        if len(records) > max_rows:
            raise RequestInvalid([f"records: {len(records)} rows, at most {max_rows} per "
                                  "request"], 413)
        problems, keys = [], []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or self.key not in rec:
                problems.append(f"records[{i}]: must be an object with '{self.key}' (this model's"
                                " features come from the feature store)")
                continue
            extra = sorted(str(k)[:60] for k in rec if k != self.key)
            if extra:
                problems.append(f"records[{i}]: send only '{self.key}'; {extra[:5]} come from the"
                                " feature store")
            k = rec[self.key]
            if self.key_type == "int64":
                if isinstance(k, bool) or not isinstance(k, int) or not \
                        INT64[0] <= k <= INT64[1]:
                    problems.append(f"records[{i}].{self.key}: must be a 64-bit integer, got "
                                    f"{repr(k)[:40]}")
            elif not isinstance(k, str) or len(k) > 256:
                problems.append(f"records[{i}].{self.key}: must be a string of at most 256 "
                                f"characters, got {repr(k)[:40]}")
            keys.append(k)
        if problems:
            raise RequestInvalid(problems)
        return keys

    def fetch(self, keys: list[Any]) -> list[dict[str, Any]]:
        """The features of each key (None where the online store has no value)."""
        cols = self.repo.online(keys, self.features)
        return [{f: cols[f][i] for f in self.features} for i in range(len(keys))]

    def check(self, keys: list[Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        missing = [i for i, r in enumerate(rows) if all(v is None for v in r.values())]
        if missing and self.spec["on_missing"] == "error":
            raise RequestInvalid([f"records[{i}].{self.key}={keys[i]!r}: unknown entity (no "
                                  "features in the online store; new entities appear after "
                                  "jobs.features action=materialize or through the stream)"
                                  for i in missing[:20]], 404)
        return rows

    def lookup(self, keys: list[Any]) -> list[dict[str, Any]]:
        return self.check(keys, self.fetch(keys))

    async def enrich(self, records: Any, max_rows: int) -> list[dict[str, Any]]:
        """The records' features. Requests that arrive while a read is in flight share the
        next read: one online-store call for all their keys (Feast's per-call cost, not the
        number of keys, dominates a lookup), so concurrency does not queue one read each."""
        keys = self.keys(records, max_rows)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self.waiting.append((keys, fut))
        if self.reader is None or self.reader.done():
            self.reader = loop.create_task(self._read_loop())
        return self.check(keys, await fut)

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            batch, self.waiting = self.waiting, []
            keys = [k for ks, _ in batch for k in ks]
            try:
                rows = await asyncio.wait_for(
                    loop.run_in_executor(self.pool, self.fetch, keys), self.timeout_s)
            except TimeoutError:
                slow = RequestInvalid([f"the online store did not answer in {self.timeout_s:g} "
                                       "s"], 503)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(slow)
                continue
            except Exception:  # noqa: BLE001 - one request's keys must not fail the others
                for ks, fut in batch:
                    if fut.done():
                        continue
                    try:
                        fut.set_result(await loop.run_in_executor(self.pool, self.fetch, ks))
                    except Exception as e:  # noqa: BLE001 - this request's own error
                        fut.set_exception(e)
                continue
            at = 0
            for ks, fut in batch:
                if not fut.done():  # a cancelled request's rows are dropped
                    fut.set_result(rows[at:at + len(ks)])
                at += len(ks)
