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

With `predict.prediction_log.enabled`, each write task also stages a part of prediction-log rows
(`_temporary/<run id>/prediction_log/predictions/model=.../date=.../part-<writer>-000000.parquet`,
predict/predlog.py). The commit places them in the log first (a failure there leaves the previous
output as it was), then commits the output as above, removes the log parts of earlier runs of
the same job, and writes `_SUCCESS` last; should any of it fail, the parts placed are removed
again. Only a process killed during the commit can leave some of its rows in the log (and no
`_SUCCESS`): the next run of the same job replaces them.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlops_ray.predict.drift import merge
from mlops_ray.predict.predlog import FEATURES, STAGED, BatchLog
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
    def __init__(self, storage: Storage, run_id: str, log: BatchLog | None = None):
        self.storage, self.run_id, self.log = storage, run_id, log

    @property
    def staging(self) -> str:
        return self.storage.path(STAGING, self.run_id)

    def write_part(self, blocks: Iterable[pa.Table], task_index: int) -> dict[str, Any]:
        """Stream blocks into one Parquet part (a row group per block); the STATS column is
        taken out and added up; with the log on, FEATURES goes into a staged log part instead.
        Returns {file, rows, counts, workers, log_file}."""
        fs = self.storage.fs
        name = f"part-{task_index:05d}.parquet"
        writer: pq.ParquetWriter | None = None
        stream = None
        log_part = self.log.part(task_index) if self.log is not None else None
        log_out: list[Any] = [None, None]  # its writer and stream, opened with the first rows
        counts: dict[str, Any] | None = None
        workers: dict[str, dict] = {}
        pending: list[pa.Table] = []
        pending_log: list[pa.Table] = []
        pending_rows = rows = 0

        def flush(writer: Any, stream: Any) -> tuple[Any, Any]:
            nonlocal pending, pending_log, pending_rows, rows
            if log_part is not None:
                if log_out[0] is None:
                    path = f"{self.staging}/{STAGED}/{log_part}"
                    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                    log_out[1] = fs.open_output_stream(path)
                    log_out[0] = pq.ParquetWriter(log_out[1], pending_log[0].schema,
                                                  compression="zstd")
                log_out[0].write_table(pa.concat_tables(pending_log))
                pending_log = []
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
                if self.log is not None:
                    pending_log.append(self.log.rows(block))
                    block = block.drop_columns([FEATURES])
                pending.append(block.drop_columns([STATS]))
                pending_rows += block.num_rows
                if pending_rows >= ROW_GROUP_ROWS:
                    writer, stream = flush(writer, stream)
            if pending:
                writer, stream = flush(writer, stream)
        finally:
            for w, s in ((writer, stream), log_out):
                if w is not None:
                    w.close()
                if s is not None:
                    s.close()
        return {"file": name if writer is not None else None, "rows": rows, "counts": counts,
                "workers": workers, "log_file": log_part if log_out[0] is not None else None}

    def commit(self, report: dict[str, Any], manifest: dict[str, Any]) -> None:
        """Move everything into place; with the log on, `manifest["prediction_log"]["parts"]`
        names the staged log parts, and gets the earlier runs' parts it replaced."""
        fs = self.storage.fs
        logged = manifest.get("prediction_log")
        placed: list[str] = []
        if self.log is not None and logged is not None:
            placed = self.log.publish(fs, f"{self.staging}/{STAGED}", logged["parts"])
        try:
            self._commit_output(report, manifest, logged)
        except BaseException:
            if self.log is not None:
                self.log.remove(placed)  # a failed job leaves none of its rows in the log
            raise

    def _commit_output(self, report: dict[str, Any], manifest: dict[str, Any],
                       logged: dict[str, Any] | None) -> None:
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
        if self.log is not None and logged is not None:
            logged["replaced"] = self.log.replace_earlier()
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
