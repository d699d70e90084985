"""The scoring callable (no Ray import): Ray Data runs one instance per actor of the pool, so the
registry version is fetched, verified and loaded once per actor, then called on every batch.

A batch comes in as an Arrow table of input columns (+ row ids) and goes out as the prediction
columns plus STATS, a string column that is null except on the batch's first row, which holds
that batch's drift counts and the worker's memory as JSON. Rows may be re-sliced downstream;
each batch's stats stay on exactly one row, so the sink adds them up exactly once. With the
prediction log on, a FEATURES column carries each row's logged inputs as JSON (predict/predlog.py).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import sys

import numpy as np
import pyarrow as pa

from mlops_ray.predict.drift import batch_counts
from mlops_ray.predict.inputs import SOURCE_FILE, SOURCE_ROW
from mlops_ray.predict.predlog import FEATURES, features_json
from mlops_ray.storage import Storage

STATS = "__batch_stats"


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def memory() -> dict[str, int]:
    """Resident memory now, in bytes: `rss`, and on Linux its parts `anon` (private to this
    process) and `shmem` (pages of Ray's shared-memory object store it has touched)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    out[{"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}[key]] = \
                        int(val.split()[0]) * 1024
    except OSError:  # not Linux
        out["rss"] = peak_rss()
    return out


def _constant(value: str, n: int) -> pa.DictionaryArray:
    """A repeated string stored once (Parquet keeps the dictionary encoding)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))


class Scorer:
    def __init__(self, ref: str, artifact_uri: str, content_hash: str, storage: Storage,
                 features: list[str], drift_numeric: list[str], drift_categorical: list[str],
                 id_column: str | None, log_fields: list[str] | None = None,
                 log_numeric: list[str] | None = None):
        from mlops_ray.artifacts.predictor import Predictor
        from mlops_ray.registry.artifact import fetch
        folder = fetch(artifact_uri, content_hash, storage)
        try:
            self.predictor = Predictor.load(folder, ref)
        finally:
            if not artifact_uri.startswith("file://"):  # a downloaded copy: loaded, not needed
                shutil.rmtree(folder, ignore_errors=True)
        self.ref, self.content_hash = ref, content_hash
        self.features, self.id_column = features, id_column
        self.log_fields, self.log_numeric = log_fields, log_numeric or []  # None: log off
        self.drift_numeric, self.drift_categorical = drift_numeric, drift_categorical
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.loaded = memory()

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        df = batch.select(self.features).to_pandas()
        # probabilities and labels by the version's judged decision rule
        p, y = self.predictor.predict(df) if n else (np.zeros(0), np.zeros(0, np.int64))
        stats = batch_counts(df, self.predictor.reference, self.drift_numeric,
                             self.drift_categorical)
        now = memory()
        stats["worker"] = {"id": self.worker, "rss_after_load": self.loaded["rss"],
                           "peak_rss": peak_rss(), "anon_after_load": self.loaded.get("anon"),
                           "anon": now.get("anon"), "shmem": now.get("shmem")}
        logged = {} if self.log_fields is None else {
            FEATURES: features_json(batch, self.log_fields, self.log_numeric)}
        ids = ({self.id_column: batch.column(self.id_column)} if self.id_column else
               {SOURCE_FILE: batch.column(SOURCE_FILE), SOURCE_ROW: batch.column(SOURCE_ROW)})
        return pa.table({
            **ids,
            "probability": pa.array(p, pa.float64()),
            "label": pa.array(np.asarray(y, np.int64)),
            "model": _constant(self.ref, n),
            "content_hash": _constant(self.content_hash, n),
            STATS: pa.array([json.dumps(stats)] + [None] * (n - 1), pa.string())
            if n else pa.array([], pa.string()),
            **logged,
        })
