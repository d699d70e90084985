"""Where a batch-scoring job writes (no Ray), and how it avoids looking complete when it is not.

    <output>/predictions/part-00000.parquet ...   one file per write task
    <output>/drift_report.json
    <output>/_SUCCESS                             written last: rows, files, model, workers

Write tasks write parts under `<output>/_temporary/<run id>/` (readers of Parquet folders skip
`_` names). Only when every task succeeded does the commit move them into place: it deletes the
old `_SUCCESS` first, replaces `predictions/` and the report, then writes the new `_SUCCESS`. A job
that fails before the commit leaves the previous output as it was (complete or not) and removes
its staging folder; one killed during the commit leaves no `_SUCCESS`. Trust the folder only when
`_SUCCESS` is there (on S3 the moves are copies, not renames).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlops_ray.predict.drift import merge
from mlops_ray.predict.scorer import STATS
from mlops_ray.storage import Storage

PREDICTIONS, REPORT, SUCCESS, STAGING = "predictions", "drift_report.json", "_SUCCESS", \
    "_temporary"
ROW_GROUP_ROWS = 65_536  # output rows per Parquet row group (blocks are buffered up to this)


def _exists(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def merge_worker(a: dict[str, dict], w: dict[str, Any]) -> None:
    """Per scoring actor: RSS after loading the model and its peak; private (anonymous) and
    object-store (shared) memory after loading / the most seen at the end of a batch (None off
    Linux)."""
    cur = a.setdefault(w["id"], {"rss_after_load": w["rss_after_load"], "peak_rss": 0,
                                 "anon_after_load": w["anon_after_load"], "peak_anon": None,
                                 "peak_shmem": None})
    cur["peak_rss"] = max(cur["peak_rss"], w["peak_rss"])
    for k in ("anon", "shmem"):
        v = w.get(k, w.get(f"peak_{k}"))
        if v is not None:
            cur[f"peak_{k}"] = max(cur[f"peak_{k}"] or 0, v)


class Output:
    def __init__(self, storage: Storage, run_id: str):
        self.storage, self.run_id = storage, run_id

    @property
    def staging(self) -> str:
        return self.storage.path(STAGING, self.run_id)

    def write_part(self, blocks: Iterable[pa.Table], task_index: int) -> dict[str, Any]:
        """Stream blocks into one Parquet part (a row group per block); the STATS column is
        taken out and added up. Returns {file, rows, counts, workers}."""
        fs = self.storage.fs
        name = f"part-{task_index:05d}.parquet"
        writer: pq.ParquetWriter | None = None
        stream = None
        counts: dict[str, Any] | None = None
        workers: dict[str, dict] = {}
        pending: list[pa.Table] = []
        pending_rows = rows = 0

        def flush(writer: Any, stream: Any) -> tuple[Any, Any]:
            nonlocal pending, pending_rows, rows
            t = pa.concat_tables(pending, promote_options="permissive")
            if writer is None:
                fs.create_dir(self.staging + f"/{PREDICTIONS}", recursive=True)
                stream = fs.open_output_stream(self.staging + f"/{PREDICTIONS}/{name}")
                writer = pq.ParquetWriter(stream, t.schema)
            writer.write_table(t.cast(writer.schema))
            rows += t.num_rows
            pending, pending_rows = [], 0
            return writer, stream

        try:
            for block in blocks:
                if block.num_rows == 0:
                    continue
                for s in block.column(STATS).drop_null().to_pylist():
                    st = json.loads(s)
                    merge_worker(workers, st.pop("worker"))
                    counts = merge(counts, st)
                pending.append(block.drop_columns([STATS]))
                pending_rows += block.num_rows
                if pending_rows >= ROW_GROUP_ROWS:
                    writer, stream = flush(writer, stream)
            if pending:
                writer, stream = flush(writer, stream)
        finally:
            if writer is not None:
                writer.close()
            if stream is not None:
                stream.close()
        return {"file": name if writer is not None else None, "rows": rows, "counts": counts,
                "workers": workers}

    def commit(self, report: dict[str, Any], manifest: dict[str, Any]) -> None:
        fs, st = self.storage.fs, self.storage
        staged = self.staging + f"/{PREDICTIONS}"
        if _exists(fs, staged) == pafs.FileType.NotFound:  # no rows: still a (empty) folder
            fs.create_dir(staged, recursive=True)
        if st.exists(SUCCESS):  # from here on the old output is no longer complete
            fs.delete_file(st.path(SUCCESS))
        if _exists(fs, st.path(PREDICTIONS)) != pafs.FileType.NotFound:
            fs.delete_dir(st.path(PREDICTIONS))
        if st.is_local:
            fs.move(staged, st.path(PREDICTIONS))  # a rename: the folder appears whole
        else:  # object stores have no folders to rename: copy + delete, part by part
            for part in st.ls(STAGING, self.run_id, PREDICTIONS):
                fs.move(f"{staged}/{part}", st.path(PREDICTIONS, part))
        st.write_json(report, REPORT)
        st.write_json(manifest, SUCCESS)
        self.cleanup()

    def cleanup(self) -> None:
        """Remove this run's staging folder (and `_temporary` when nothing else is in it)."""
        fs = self.storage.fs
        try:
            if _exists(fs, self.staging) != pafs.FileType.NotFound:
                fs.delete_dir(self.staging)
            if not self.storage.ls(STAGING):
                if _exists(fs, self.storage.path(STAGING)) != pafs.FileType.NotFound:
                    fs.delete_dir(self.storage.path(STAGING))
        except OSError:
            pass  # best effort: a leftover `_temporary` is ignored by readers
