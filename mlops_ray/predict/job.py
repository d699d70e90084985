"""jobs.predict end to end: a registry version scores a Parquet/CSV dataset with Ray Data.

Before Ray starts: the version is resolved and verified, and every input file's columns are
checked against its signature. Then one streaming pipeline: read tasks (row groups / CSV files)
-> `map_batches` over an actor pool of `Scorer`s (each loads the version once) -> a datasink
whose write tasks stream Parquet parts into a staging folder and return the drift counts of
what they wrote. The driver adds the counts up, writes the drift report, and commits (see
`mlops_ray.predict.output`). No process ever holds more than a few blocks of the input. With
`predict.prediction_log.enabled`, every scored row also goes to the online prediction log, in
its schema (`mlops_ray.predict.predlog`), staged and committed with the output.
"""
from __future__ import annotations

import copy
import functools
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from mlops_ray.config.batch import PredictJob
from mlops_ray.data import traffic
from mlops_ray.errors import ConfigError, MlopsError
from mlops_ray.predict.drift import drift_columns, drift_table, merge
from mlops_ray.predict.inputs import ReadUnit, TableInput
from mlops_ray.predict.output import PREDICTIONS, REPORT, SUCCESS, Output, merge_worker
from mlops_ray.predict.predlog import BatchLog, job_key, logged_fields
from mlops_ray.predict.scorer import Scorer
from mlops_ray.storage import Storage, prediction_log, resolve


def _read(inp: TableInput, unit: ReadUnit, columns: list[str], numeric: list[str],
          id_column: str | None) -> Iterator[pa.Table]:
    yield from inp.read(unit, columns, numeric, id_column)


def _inside(a: Storage, b: Storage) -> bool:
    """Whether `a` is `b` or lies below it (same scheme)."""
    return a.uri == b.uri or a.uri.startswith(b.uri.rstrip("/") + "/")


def _ray_data_classes() -> tuple[type, type]:
    """The Datasource and Datasink subclasses (defined here so only this job imports Ray)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasink

    class InputDatasource(Datasource):
        def __init__(self, inp: TableInput, units: list[ReadUnit], columns: list[str],
                     numeric: list[str], id_column: str | None):
            super().__init__()
            self.inp, self.units, self.columns = inp, units, columns
            self.numeric, self.id_column = numeric, id_column

        def get_name(self) -> str:
            return self.inp.format.capitalize()  # Ray Data shows it as ReadParquet / ReadCsv

        def estimate_inmemory_data_size(self) -> int | None:
            sizes = [u.size_bytes for u in self.units]
            return sum(s for s in sizes if s) if all(sizes) else None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            # one task per unit whatever `parallelism` asks: units are already bounded
            return [ReadTask(functools.partial(_read, self.inp, u, self.columns, self.numeric,
                                               self.id_column),
                             BlockMetadata(num_rows=u.rows, size_bytes=u.size_bytes,
                                           input_files=(u.file.path,), exec_stats=None),
                             per_task_row_limit=per_task_row_limit)
                    for u in self.units]

    class PredictionDatasink(Datasink):
        def __init__(self, output: Output, rows_per_file: int):
            self.output, self.rows_per_file = output, rows_per_file
            self.returns: list[dict[str, Any]] | None = None

        def get_name(self) -> str:
            return "WritePredictions"

        @property
        def min_rows_per_write(self) -> int | None:
            return self.rows_per_file

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
            return self.output.write_part(blocks, ctx.task_idx)

        def on_write_complete(self, write_result: Any) -> None:
            self.returns = list(write_result.write_returns)

    return InputDatasource, PredictionDatasink


def _user_error(e: BaseException) -> MlopsError | None:
    """Our typed error behind a Ray task failure (Ray wraps what the task raised)."""
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, MlopsError) and not isinstance(getattr(x, "cause", None),
                                                         BaseException):
            return x  # the error itself, not Ray's wrapper that subclasses it
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def run(job: PredictJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score `job.input` with `job.ref` into `job.output`; returns the manifest."""
    from mlops_ray.registry import open_registry
    t0 = time.monotonic()
    p, st = job.predict, job.storage
    reg = open_registry(job)
    version, folder = reg.fetch(job.ref)
    signature = json.loads((folder / "signature.json").read_text())
    reference = json.loads((folder / "reference.json").read_text())
    if not version.artifact_uri.startswith("file://"):
        shutil.rmtree(folder, ignore_errors=True)  # the actors fetch (and verify) their own

    inp = TableInput(job.input, p.format, st.endpoint_url, st.region)
    id_column = p.id_column
    columns = inp.check(signature, id_column,
                        [*reference["numeric"], *reference["categorical"]])
    out = resolve(job.output, st.endpoint_url, st.region)
    if _inside(out, inp.storage) or _inside(inp.storage, out):
        raise ConfigError(f"output='{job.output}' overlaps input='{job.input}': write the "
                          "predictions somewhere else")
    inputs_used = {i["name"] for i in signature["inputs"]} | set(reference["numeric"]) \
        | set(reference["categorical"])
    features = [c for c in columns if c != id_column or c in inputs_used]
    numeric = [i["name"] for i in signature["inputs"] if i["kind"] == "numeric"]
    drift_num, drift_cat = drift_columns(reference, set(features))
    units = inp.units()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    plog = p.prediction_log
    blog, log_kwargs = None, {}
    if plog.enabled:
        fields, log_numeric = logged_fields(signature, columns, plog.log_sensitive,
                                            plog.exclude)
        log_kwargs = {"log_fields": fields, "log_numeric": log_numeric}
        infos = inp.storage.fs.get_file_info([f.path for f in inp.files])
        key = job_key(version.ref, version.content_hash, inp.storage.uri, id_column, [
            (f.name, i.size, None if i.mtime is None else i.mtime.isoformat())
            for f, i in zip(inp.files, infos, strict=True)])
        log_store = prediction_log(st.plain(), plog.uri)
        if _inside(log_store, out) or _inside(out, log_store):
            raise ConfigError(f"predict.prediction_log at '{log_store.uri}' overlaps "
                              f"output='{job.output}': log somewhere else")
        blog = BatchLog(log_store, version.model, version.version, datetime.now(timezone.utc),
                        key, run_id, id_column)

    from mlops_ray.runtime import ensure_ray
    ensure_ray(job.ray.plain())
    import ray.data
    ctx = ray.data.DataContext.get_current()
    saved = copy.deepcopy(ctx.execution_options), ctx.enable_progress_bars  # process-wide
    ctx.execution_options.preserve_order = True  # same input, same part files
    ctx.enable_progress_bars = False
    if p.object_store_mb:  # blocks in flight (read, scored, not yet written) stay under it
        ctx.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=p.object_store_mb * (1 << 20))
    source_cls, sink_cls = _ray_data_classes()
    output = Output(out, run_id, blog)
    sink = sink_cls(output, p.rows_per_file)
    conc = p.concurrency
    try:
        ds = ray.data.read_datasource(source_cls(inp, units, columns, numeric, id_column))
        ds = ds.map_batches(
            Scorer, batch_size=p.batch_size, batch_format="pyarrow", zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(min_size=conc[0], max_size=conc[1])
            if isinstance(conc, list) else ray.data.ActorPoolStrategy(size=conc),
            num_cpus=p.num_cpus,
            fn_constructor_kwargs={
                "ref": version.ref, "artifact_uri": version.artifact_uri,
                "content_hash": version.content_hash, "storage": reg.storage,
                "features": features, "drift_numeric": drift_num,
                "drift_categorical": drift_cat, "id_column": id_column, **log_kwargs})
        ds.write_datasink(sink)
        returns = sink.returns or []
        counts: dict[str, Any] | None = None
        workers: dict[str, dict] = {}
        for r in returns:
            counts = merge(counts, r["counts"])
            for w, m in r["workers"].items():
                merge_worker(workers, {"id": w, **m})
        rows = sum(r["rows"] for r in returns)
        table = drift_table(counts, reference, p.drift.plain())
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        facts = {"model": version.ref, "requested": job.ref,
                 "content_hash": version.content_hash, "input": inp.storage.uri,
                 "input_files": len(inp.files), "format": inp.format, "rows_scored": rows,
                 "created_at": created}
        report = {**facts, "thresholds": p.drift.plain(), "features": table,
                  "alerts": [r["feature"] for r in table if r.get("alert")]}
        manifest = {**facts, "status": "complete", "output": out.uri,
                    "files": sorted(f"{PREDICTIONS}/{r['file']}" for r in returns if r["file"]),
                    "id_columns": [id_column] if id_column else ["source_file", "source_row"],
                    "drift_report": REPORT, "alerts": report["alerts"],
                    "workers": [{"id": k, **v} for k, v in sorted(workers.items())],
                    "wall_s": round(time.monotonic() - t0, 2)}
        if blog is not None:  # latency_ms is null: a batch has no per-request latency
            manifest["prediction_log"] = {
                "uri": blog.storage.uri_of(traffic.PREDICTIONS), "ts": blog.ts.isoformat(),
                "job_key": blog.key, "rows": sum(r["rows"] for r in returns if r["log_file"]),
                "parts": sorted(r["log_file"] for r in returns if r["log_file"])}
        output.commit(report, manifest)
    except BaseException as e:
        output.cleanup()
        err = _user_error(e)
        if err is not None and err is not e:
            raise err from None
        raise
    finally:
        ctx.execution_options, ctx.enable_progress_bars = saved
    _summary(manifest, report, out, log)
    return manifest


def _summary(manifest: dict[str, Any], report: dict[str, Any], out: Storage,
             log: Callable[[str], None]) -> None:
    from mlops_ray.evaluation.drift import format_table
    mib = 1 << 20
    w = manifest["workers"]
    log(f"model       {manifest['model']} (requested {manifest['requested']}, content "
        f"{manifest['content_hash'][:16]}…)\n"
        f"input       {manifest['input']} ({manifest['input_files']} {manifest['format']} "
        f"file(s))\n"
        f"scored      {manifest['rows_scored']} rows\n"
        f"predictions {out.uri_of(PREDICTIONS)} ({len(manifest['files'])} file(s))\n"
        f"drift       {out.uri_of(REPORT)}: "
        f"{', '.join(report['alerts']) or 'no'} alert(s)\n{format_table(report['features'])}")
    plog = manifest.get("prediction_log")
    if plog:
        log(f"logged      {plog['rows']} rows to {plog['uri']} ({len(plog['parts'])} part(s); "
            f"replaced {len(plog['replaced'])} part(s) of earlier runs of this job)")
    if w:
        log(f"workers     {len(w)} scoring actor(s); peak RSS "
            f"{max(x['peak_rss'] for x in w) / mib:.0f} MiB (after loading the model "
            f"{max(x['rss_after_load'] for x in w) / mib:.0f} MiB)")
    log(f"complete    {out.uri_of(SUCCESS)}\nwall time   {manifest['wall_s']} s")
