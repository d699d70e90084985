"""Batch predictions into the online prediction log (no Ray), so offline and online answers can
be compared and go through the same label join (data/traffic.py, serving/predlog.py).

Every scored row becomes one row of PREDICTION_SCHEMA: request_id = the row's id (the
`predict.id_column` value, else `<source_file>:<source_row>`), row = 0, ts = the job's scoring
time (one for the whole job, so its rows sit in one day folder), arm = endpoint = "batch",
features = the record as the online validator passes it on (numbers as float, categories as
strings, missing as null; the signature's role=sensitive inputs and `exclude` left out as online),
probability and label as in the job's output, latency_ms = null (a batch has no per-request
latency; the job's wall time is in `_SUCCESS`).

Write tasks stage their part next to their predictions part under the output's `_temporary/`;
the commit copies the parts into the log (`publish`) and then removes the parts earlier runs of
the same job left there (`superseded`). A part is named after its writer,
`batch-<job key>-<run id>-<task>`: the job key is a hash of what decides the rows (model version,
input files with their sizes and modification times, id column); the run id starts with the UTC
time, so a later run of the same job replaces the rows of earlier ones instead of adding to them.
"""
from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from mlops_ray.data import traffic
from mlops_ray.predict.inputs import SOURCE_FILE, SOURCE_ROW
from mlops_ray.storage import Storage

FEATURES = "__features"  # the scorer's JSON of each row's logged inputs (taken out by the sink)
STAGED = "prediction_log"  # below the run's staging folder: <STAGED>/predictions/model=.../...
ARM = ENDPOINT = "batch"


def logged_fields(signature: dict[str, Any], columns: list[str], log_sensitive: bool,
                  exclude: list[str]) -> tuple[list[str], list[str]]:
    """(fields, numeric fields) that go into `features`: the signature's inputs the input has,
    in the signature's order (the online records' order), less what the online writer strips."""
    drop = set(exclude)
    if not log_sensitive:
        drop |= {i["name"] for i in signature["inputs"] if i.get("role") == "sensitive"}
    present = set(columns)
    fields = [i for i in signature["inputs"] if i["name"] in present and i["name"] not in drop]
    return ([i["name"] for i in fields],
            [i["name"] for i in fields if i["kind"] == "numeric"])


def _number(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _category(v: Any) -> str | None:
    if v is None or isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # as the validator: 5054.0 is the category "5054"
    return v if isinstance(v, str) else str(v)


def features_json(table: pa.Table, fields: list[str], numeric: list[str]) -> pa.Array:
    """One JSON object per row, as `traffic.prediction_table` writes an online record."""
    num = set(numeric)
    cols = [[_number(v) for v in table.column(f).cast(pa.float64()).to_pylist()] if f in num
            else [_category(v) for v in table.column(f).to_pylist()] for f in fields]
    return pa.array([json.dumps(dict(zip(fields, vals, strict=True)), separators=(",", ":"))
                     for vals in zip(*cols, strict=True)] if fields else
                    ["{}"] * table.num_rows, pa.string())


def request_ids(table: pa.Table, id_column: str | None) -> pa.Array:
    """The row ids the job writes, as the log's request_id."""
    if id_column is not None:
        return pa.array(["" if v is None else str(v)
                         for v in table.column(id_column).to_pylist()], pa.string())
    return pa.array([f"{f}:{r}" for f, r in zip(table.column(SOURCE_FILE).to_pylist(),
                                                table.column(SOURCE_ROW).to_pylist(),
                                                strict=True)], pa.string())


def job_key(ref: str, content_hash: str, input_uri: str, id_column: str | None,
            files: list[tuple[str, int | None, str | None]]) -> str:
    """What decides a batch's log rows: the version, the input files (name, size, mtime) and the
    id column. Not the output folder: the same rows scored into two outputs are logged once."""
    blob = json.dumps([ref, content_hash, input_uri, id_column, sorted(files)])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def writer(key: str, run_id: str, task: int) -> str:
    return f"batch-{key}-{run_id}-{task:05d}"


def superseded(parts: list[str], key: str, run_id: str) -> list[str]:
    """The parts (log-relative paths) of earlier runs of job `key`: run ids before `run_id`."""
    prefix = f"part-batch-{key}-"
    out = []
    for p in parts:
        name = p.rsplit("/", 1)[-1]
        if name.startswith(prefix):
            run = "-".join(name[len(prefix):].split("-")[:2])
            if run < run_id:
                out.append(p)
    return out


@dataclass(frozen=True)
class BatchLog:
    """What write tasks need to turn scored blocks into log rows, and the commit's moves."""
    storage: Storage  # the log's root (storage.prediction_log)
    model: str
    version: int
    ts: datetime  # the job's scoring time (UTC)
    key: str
    run_id: str
    id_column: str | None

    def part(self, task: int) -> str:
        """A write task's part, relative to the log root (and to the staging folder)."""
        return traffic.part_path(traffic.PREDICTIONS, self.model, self.ts.strftime("%Y-%m-%d"),
                                 writer(self.key, self.run_id, task), 0)

    def rows(self, block: pa.Table) -> pa.Table:
        """A scored block (ids, probability, label, FEATURES) as log rows."""
        n = block.num_rows
        return pa.table({
            "request_id": request_ids(block, self.id_column),
            "row": pa.array([0] * n, pa.int32()),
            "ts": pa.array([self.ts] * n, traffic.PREDICTION_SCHEMA.field("ts").type),
            "model": pa.array([self.model] * n, pa.string()),
            "version": pa.array([self.version] * n, pa.int64()),
            "arm": pa.array([ARM] * n, pa.string()),
            "endpoint": pa.array([ENDPOINT] * n, pa.string()),
            "features": block.column(FEATURES).combine_chunks().cast(pa.string()),
            "probability": block.column("probability").cast(pa.float64()),
            "label": block.column("label").cast(pa.int64()),
            "latency_ms": pa.nulls(n, pa.float32()),
        }, schema=traffic.PREDICTION_SCHEMA)

    def publish(self, src_fs: pafs.FileSystem, staging: str, parts: list[str]) -> list[str]:
        """Copy staged parts (relative paths below `staging`) into the log, each whole (local:
        a rename or a copy to a temporary name + rename; S3: one object). On a failure the
        parts already placed are removed again. Returns the parts placed."""
        placed: list[str] = []
        try:
            for rel in parts:
                _place(src_fs, f"{staging}/{rel}", self.storage, rel)
                placed.append(rel)
        except BaseException:
            self.remove(placed)
            raise
        return placed

    def replace_earlier(self) -> list[str]:
        """Remove the parts earlier runs of this job left in the log; returns them."""
        old = superseded(traffic.parts(self.storage, traffic.PREDICTIONS, self.model),
                         self.key, self.run_id)
        for rel in old:
            self.storage.fs.delete_file(self.storage.path(rel))
        return old

    def remove(self, parts: list[str]) -> None:
        for rel in parts:
            try:
                self.storage.fs.delete_file(self.storage.path(rel))
            except OSError:
                pass  # best effort: the caller's error is what matters


def _place(src_fs: pafs.FileSystem, src: str, dst: Storage, rel: str) -> None:
    dest = dst.path(rel)
    dst.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
    if not dst.is_local:  # an S3 object appears whole when its upload completes
        pafs.copy_files(src, dest, source_filesystem=src_fs, destination_filesystem=dst.fs)
        return
    if isinstance(src_fs, pafs.LocalFileSystem):
        try:
            dst.fs.move(src, dest)  # a rename (same device)
            return
        except OSError:
            pass
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"  # not a part name: readers skip it
    pafs.copy_files(src, tmp, source_filesystem=src_fs, destination_filesystem=dst.fs)
    dst.fs.move(tmp, dest)
