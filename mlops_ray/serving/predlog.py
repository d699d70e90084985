"""The prediction log's writer in each ingress replica: answered records and late labels are
buffered in memory on the request path (an append) and written as Parquet parts
(data/traffic.py) by a background task: every `flush_interval_s`, as soon as `flush_rows` rows
wait, and when the replica drains or shuts down. Writes run in a worker thread, one at a time,
in order. What a crash loses is what was not written yet: at most one flush window.

When writes fail (storage down) the rows stay buffered and are retried on the next flush, up to
`max_buffer_rows`; beyond that new rows are dropped and counted (`mlops_predlog_dropped`), never
blocking or failing a request.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from mlops_ray.data import traffic
from mlops_ray.metrics import metric

log = logging.getLogger("ray.serve")


class PredictionLogger:
    def __init__(self, cfg: dict[str, Any], storage_cfg: dict[str, Any], model: str,
                 writer: str):
        from mlops_ray.storage import prediction_log
        self.cfg, self.model, self.writer = cfg, model, writer
        self.storage = prediction_log(storage_cfg, cfg.get("uri"))
        self.preds: list[dict[str, Any]] = []
        self.labels: list[dict[str, Any]] = []
        self.rows = 0  # rows buffered (predictions and labels)
        self.oldest: float | None = None  # monotonic time of the oldest buffered row
        self.seq = 0
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.dropped = self.written = 0
        self._strip: dict[str, frozenset[str]] = {}  # ref -> fields left out of the log

    def stripped(self, ref: str, sig: dict[str, Any]) -> frozenset[str]:
        if ref not in self._strip:
            out = set(self.cfg.get("exclude") or [])
            if not self.cfg.get("log_sensitive"):
                out |= {f["name"] for f in sig["inputs"] if f.get("role") == "sensitive"}
            self._strip[ref] = frozenset(out)
        return self._strip[ref]

    def _room(self, n: int) -> bool:
        if self.rows + n > int(self.cfg["max_buffer_rows"]):
            self.dropped += n
            metric("mlops_predlog_dropped").inc(n, tags={"model": self.model,
                                                         "reason": "buffer_full"})
            return False
        if self.oldest is None:
            self.oldest = time.monotonic()
        self.rows += n
        if self.rows >= int(self.cfg["flush_rows"]):
            self.wake.set()
        return True

    # --- the request path: appends only ---------------------------------------------------------
    def prediction(self, request_id: str, ref: str, sig: dict[str, Any], arm: str,
                   endpoint: str, records: list[dict[str, Any]], result: dict[str, Any],
                   latency_ms: float) -> None:
        rate = float(self.cfg["sample_rate"])
        if rate < 1.0 and random.random() >= rate:  # nosec B311 - sampling, not security
            return
        n = len(result["probabilities"])
        if not self._room(n):
            return
        drop = self.stripped(ref, sig)
        self.preds.append({
            "request_id": request_id, "ts": traffic.now(), "model": self.model,
            "version": int(ref.split(":")[-1]), "arm": arm, "endpoint": endpoint,
            "records": [{k: v for k, v in r.items() if k not in drop} for r in records]
            if drop else records,
            "probabilities": result["probabilities"], "labels": result["labels"],
            "latency_ms": latency_ms})

    def feedback(self, request_id: str, labels: list[int], source: str = "feedback") -> None:
        if self._room(len(labels)):
            self.labels.append({"request_id": request_id, "labels": labels,
                                "label_ts": traffic.now(), "source": source})

    # --- the background writer --------------------------------------------------------------------
    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), float(self.cfg["flush_interval_s"]))
            except TimeoutError:
                pass
            self.wake.clear()
            await self.flush()

    def lag_s(self) -> float:
        return 0.0 if self.oldest is None else time.monotonic() - self.oldest

    async def flush(self) -> int:
        """Write what is buffered; the rows written (0 when a write failed: kept for later)."""
        async with self.lock:
            metric("mlops_predlog_lag_seconds").set(self.lag_s(), tags={"model": self.model})
            if not self.rows:
                return 0
            preds, labels, rows, oldest = self.preds, self.labels, self.rows, self.oldest
            self.preds, self.labels, self.rows, self.oldest = [], [], 0, None
            done: list[str] = []
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._write, preds,
                                                                 labels, done)
            except Exception as e:  # noqa: BLE001 - a failing store must never fail requests
                log.warning("prediction log: writing to %s failed (rows kept, retried): %s",
                            self.storage.uri, e)
                # what was not written goes back in front of what came since
                if traffic.PREDICTIONS not in done:
                    self.preds = preds + self.preds
                if traffic.LABELS not in done:
                    self.labels = labels + self.labels
                back = sum(len(x["labels"]) for kind, entries in ((traffic.PREDICTIONS, preds),
                                                                  (traffic.LABELS, labels))
                           if kind not in done for x in entries)
                self.rows += back
                rows -= back
                self.oldest = oldest
            self.written += rows
            metric("mlops_predlog_lag_seconds").set(self.lag_s(), tags={"model": self.model})
            return rows

    def _write(self, preds: list[dict[str, Any]], labels: list[dict[str, Any]],
               done: list[str]) -> None:
        """Each log's part (named after the day of its first row, so a part never holds rows
        of an earlier day); `done` says which were written should the next one fail."""
        for kind, entries, table, ts in (
                (traffic.PREDICTIONS, preds, traffic.prediction_table, "ts"),
                (traffic.LABELS, labels, traffic.label_table, "label_ts")):
            if not entries:
                continue
            t = table(entries)
            day = entries[0][ts].strftime("%Y-%m-%d")
            self.storage.write_bytes(traffic.parquet_bytes(t), traffic.part_path(
                kind, self.model, day, self.writer, self.seq))
            self.seq += 1
            done.append(kind)
            metric("mlops_predlog_rows").inc(t.num_rows, tags={"model": self.model,
                                                               "log": kind})

    async def close(self) -> None:
        """Drain: write everything buffered (the replica is shutting down)."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        await self.flush()
