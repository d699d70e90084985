"""The prediction log and the label log as data (no Ray): their schema, where their Parquet parts
live, reading them back, the point-in-time join of late labels, and the training table that
retraining assembles from labelled traffic.

    <root>/predictions/model=<name>/date=<YYYY-MM-DD>/part-<writer>-<seq>.parquet
    <root>/labels/model=<name>/date=<YYYY-MM-DD>/part-<writer>-<seq>.parquet

A prediction row is one answered record: request_id and row (its place in the request) name it;
a label row says what the outcome of that record was and when that became known (label_ts).
Parts are written whole (temporary name + rename, or one S3 PUT): a reader never sees half a
part. Both logs are append-only; a corrected label is a new row with a later label_ts.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlops_ray.errors import DataValidationError

PREDICTIONS, LABELS = "predictions", "labels"
_TS = pa.timestamp("us", tz="UTC")
PREDICTION_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("row", pa.int32()), ("ts", _TS), ("model", pa.string()),
    ("version", pa.int64()), ("arm", pa.string()), ("endpoint", pa.string()),
    ("features", pa.string()),  # JSON object of the inputs, after PII/sensitive removal
    ("probability", pa.float64()), ("label", pa.int64()), ("latency_ms", pa.float32())])
LABEL_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("row", pa.int32()), ("label", pa.int64()),
    ("label_ts", _TS), ("source", pa.string())])


def now() -> datetime:
    return datetime.now(UTC)


def prediction_table(entries: Iterable[dict[str, Any]]) -> pa.Table:
    """One row per answered record. An entry: request_id, ts (datetime), model, version, arm,
    endpoint, records (already stripped), probabilities, labels, latency_ms."""
    cols: dict[str, list] = {f.name: [] for f in PREDICTION_SCHEMA}
    for e in entries:
        n = len(e["probabilities"])
        cols["request_id"] += [e["request_id"]] * n
        cols["row"] += list(range(n))
        for k in ("ts", "model", "version", "arm", "endpoint", "latency_ms"):
            cols[k] += [e[k]] * n
        cols["features"] += [json.dumps(r, separators=(",", ":"), default=str)
                             for r in e["records"]]
        cols["probability"] += [float(p) for p in e["probabilities"]]
        cols["label"] += [int(y) for y in e["labels"]]
    return pa.table(cols, schema=PREDICTION_SCHEMA)


def label_table(entries: Iterable[dict[str, Any]]) -> pa.Table:
    """Label rows: entries of request_id, labels (one per answered row), label_ts, source."""
    cols: dict[str, list] = {f.name: [] for f in LABEL_SCHEMA}
    for e in entries:
        n = len(e["labels"])
        cols["request_id"] += [e["request_id"]] * n
        cols["row"] += list(range(n)) if e.get("rows") is None else list(e["rows"])
        cols["label"] += [int(v) for v in e["labels"]]
        cols["label_ts"] += [e["label_ts"]] * n
        cols["source"] += [e["source"]] * n
    return pa.table(cols, schema=LABEL_SCHEMA)


def part_path(log: str, model: str, day: str, writer: str, seq: int) -> str:
    return f"{log}/model={model}/date={day}/part-{writer}-{seq:06d}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def parts(storage: Any, log: str, model: str, until: datetime | None = None) -> list[str]:
    """The parts of a model's log (paths relative to the storage root), oldest day first; with
    `until`, days after it are left out (their rows are all later)."""
    base = storage.path(log, f"model={model}")
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    out = []
    for info in storage.fs.get_file_info(sel):
        rel = info.path[len(storage.root.rstrip("/")) + 1:]
        name = rel.rsplit("/", 1)[-1]
        if info.type != pafs.FileType.File or not name.startswith("part-") \
                or not name.endswith(".parquet"):
            continue  # a temporary name of a part being written
        day = rel.split("date=")[-1].split("/")[0]
        if until is None or day <= until.strftime("%Y-%m-%d"):
            out.append(rel)
    return sorted(out)


def read(storage: Any, log: str, model: str, until: datetime | None = None
         ) -> tuple[pd.DataFrame, list[str]]:
    """The model's log as one frame (the schema's columns) and the parts it came from."""
    schema = PREDICTION_SCHEMA if log == PREDICTIONS else LABEL_SCHEMA
    names = parts(storage, log, model, until)
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(n))).cast(schema) for n in names]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.to_pandas(), names


def labelled(predictions: pd.DataFrame, labels: pd.DataFrame, cutoff: datetime
             ) -> pd.DataFrame:
    """Point in time: the predictions answered by `cutoff` joined with the labels known by
    `cutoff` (label_ts <= cutoff). A record labelled twice takes its latest label known then;
    a label for a request the log does not hold is left out. One row per labelled record."""
    ts = pd.Timestamp(cutoff)
    p = predictions[predictions["ts"] <= ts]
    known = labels[labels["label_ts"] <= ts].sort_values("label_ts", kind="stable")
    latest = known.drop_duplicates(["request_id", "row"], keep="last")
    out = p.merge(latest[["request_id", "row", "label", "label_ts"]].rename(
        columns={"label": "outcome"}), on=["request_id", "row"], how="inner")
    return out.drop_duplicates(["request_id", "row"]).reset_index(drop=True)


def features_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The logged inputs as columns (one per feature)."""
    return pd.DataFrame.from_records([json.loads(s) for s in rows["features"]],
                                     index=rows.index)


def negative_value(original_labels: pd.Series, positive: Any) -> Any:
    """The label value a logged 0 stands for: the original data's other class (its most
    frequent non-positive value, were there several)."""
    rest = original_labels[original_labels != positive]
    if rest.empty:
        raise DataValidationError("labelled traffic", [
            f"the original data has no label other than the positive value {positive!r}: a "
            "logged 0 cannot be mapped to a label value"])
    return rest.value_counts().index[0]


def traffic_table(rows: pd.DataFrame, original: pd.DataFrame, label: str, positive: Any
                  ) -> pd.DataFrame:
    """Labelled traffic in the original data's columns: logged inputs, and the outcome as the
    original label's values (1 -> positive, 0 -> the other class). Columns the log does not
    hold (sensitive attributes logged off, PII) are missing values."""
    feats = features_frame(rows)
    neg = negative_value(original[label], positive)
    out = pd.DataFrame(index=rows.index)
    for c in original.columns:
        if c == label:
            out[c] = np.where(rows["outcome"].to_numpy() == 1, positive, neg)
        elif c not in feats.columns:
            out[c] = None
        elif original[c].dtype.kind in "fiu":  # served numbers are floats
            out[c] = pd.to_numeric(feats[c], errors="coerce")
        else:
            out[c] = feats[c]
    return out


def mix(original: pd.DataFrame, traffic: pd.DataFrame, original_ratio: float, seed: int
        ) -> pd.DataFrame:
    """The retraining table: every labelled traffic row, plus a seeded uniform sample of the
    original rows, `original_ratio` times as many as the traffic rows (at most all of them).
    Traffic rows come last, in log order; the result is the same for the same inputs."""
    n = min(len(original), int(round(original_ratio * len(traffic))))
    keep = original.sample(n=n, random_state=seed) if n < len(original) else original
    return pd.concat([keep, traffic], ignore_index=True)


def digest(names: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
