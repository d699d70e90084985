"""Closing the loop from the prediction log (data/traffic.py): the gates judged on the
production version's labelled traffic, the retraining table assembled from logged traffic plus
the original data, and the import of a file of late labels."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from mlops_ray.config.pipeline import LabelsJob, MonitorJob
from mlops_ray.data import traffic
from mlops_ray.errors import ConfigError, DataValidationError


def log_storage(job: Any) -> Any:
    from mlops_ray.storage import prediction_log
    return prediction_log(job.storage.plain(), job.serve.prediction_log.uri)


def cutoff_of(job: MonitorJob) -> datetime:
    c = job.monitor.cutoff
    if c is None:
        return traffic.now()
    t = datetime.fromisoformat(c)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def labelled_traffic(job: Any, model: str, cutoff: datetime
                     ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Labelled records known at `cutoff`, and the log parts they were read from."""
    store = log_storage(job)
    preds, pparts = traffic.read(store, traffic.PREDICTIONS, model, cutoff)
    labels, lparts = traffic.read(store, traffic.LABELS, model, cutoff)
    return traffic.labelled(preds, labels, cutoff), {
        "log": store.uri, "prediction_parts": pparts, "label_parts": lparts}


def live_gates(job: MonitorJob, version: int, rows: pd.DataFrame, signature: dict[str, Any]
               ) -> dict[str, Any] | None:
    """The gates on the labelled traffic `version` answered (None: fewer rows than
    monitor.min_labelled_rows); published as `ray_mlops_live_*`."""
    from mlops_ray.evaluation import gates as gmod
    from mlops_ray.evaluation.live import live_report
    mine = rows[rows["version"] == version]
    if len(mine) < job.monitor.min_labelled_rows:
        return None
    feats = traffic.features_frame(mine)
    attrs = list(job.fairness.attributes or job.dataset.sensitive)
    groups = pd.DataFrame({a: feats[a] if a in feats.columns else None for a in attrs},
                          index=mine.index)
    rules = gmod.expand_rules([r.plain() for r in job.gates.rules], attrs)
    rep = live_report(mine["outcome"].to_numpy(), mine["probability"].to_numpy(),
                      mine["label"].to_numpy(), groups, rules, float(signature["threshold"]),
                      job.fairness.min_group_size, job.fairness.n_boot, job.seed)
    _publish(job.model_name, version, rep)
    return rep


def _publish(model: str, version: int, rep: dict[str, Any]) -> None:
    from mlops_ray.metrics import metric
    tags = {"model": model, "version": str(version)}
    metric("mlops_live_labelled_rows").set(rep["rows"], tags=tags)
    for g in rep["gates"]:
        metric("mlops_live_gate_ok").set(1.0 if g["passed"] else 0.0,
                                         tags={**tags, "gate": g["name"]})
        if np.isfinite(g["value"]):
            metric("mlops_live_metric").set(g["value"], tags={**tags, "metric": g["metric"]})


def retraining_table(job: MonitorJob, rows: pd.DataFrame, sources: dict[str, Any],
                     cutoff: datetime) -> dict[str, Any]:
    """Write the retraining table: every labelled traffic record (all versions) in the original
    data's columns, plus a seeded sample of the original rows (monitor.original_ratio per
    traffic row). Returns the `dataset` section that reads it, its `sources` the lineage."""
    from mlops_ray.data.io import load_table
    from mlops_ray.storage import from_cfg
    ds, m = job.dataset, job.monitor
    if ds.sensitive and not job.serve.prediction_log.log_sensitive:
        raise ConfigError(
            f"monitor: retraining from the prediction log needs the sensitive attributes "
            f"{ds.sensitive} (the gates judge fairness on them), and "
            "serve.prediction_log.log_sensitive=false leaves them out of the log: set it to true "
            "where policy allows, or name a table with monitor.new_data")
    if rows.empty:
        raise DataValidationError("prediction log", [
            f"no labelled traffic known at {cutoff.isoformat()} in {sources['log']} (labels "
            "arrive by POST /feedback or python -m jobs.labels)"])
    original = load_table(ds.uri, ds.format, job.storage.endpoint_url, job.storage.region)
    t = traffic.traffic_table(rows, original, ds.label, ds.positive)
    split = ds.split
    if split.column:  # traffic has no split mark: a seeded share joins the test rows
        rng = np.random.default_rng(job.seed)
        t[split.column] = np.where(rng.random(len(t)) < split.test, split.test_value, "train")
    table = traffic.mix(original, t, m.original_ratio, job.seed)
    n_traffic = len(rows)
    digest = traffic.digest([*sources["prediction_parts"], *sources["label_parts"],
                             cutoff.isoformat(), ds.uri, str(m.original_ratio),
                             str(job.seed)])
    store = from_cfg(job.storage.plain())
    rel = f"retraining/{job.model_name}/{digest}.parquet"
    uri = store.write_bytes(table.to_parquet(index=False), rel)
    src = {**sources, "cutoff": cutoff.isoformat(), "table": uri,
           "rows": {"traffic": n_traffic, "original": len(table) - n_traffic},
           "original_uri": ds.uri,
           "rule": f"every labelled traffic record known at the cutoff + a seeded sample of "
                   f"{m.original_ratio:g} original rows per traffic row (seed {job.seed})"
                   + (f"; {split.test:g} of the traffic rows marked {split.column}="
                      f"{split.test_value}" if split.column else ""),
           "versions": sorted(int(v) for v in rows["version"].unique())}
    return {**ds.plain(), "uri": uri, "format": "parquet", "sources": src}


LABEL_COLUMNS = ("request_id", "label", "time")


def import_labels(job: LabelsJob, log: Any = print) -> dict[str, Any]:
    """Validate a file of (request_id, label, time[, row]) and append it to the label log in one
    part (all or nothing). Labels for requests the log does not hold (yet) are kept and
    counted: the join happens at retraining time."""
    from mlops_ray.data.io import load_table
    df = load_table(job.file, "auto", job.storage.endpoint_url, job.storage.region)
    problems = [f"column {c!r} is missing (columns: {list(df.columns)[:10]})"
                for c in LABEL_COLUMNS if c not in df.columns]
    if not problems:
        y = pd.to_numeric(df["label"], errors="coerce")
        bad = df.index[~y.isin([0, 1])].tolist()
        if bad:
            problems.append(f"label: rows {bad[:5]} hold {df.loc[bad[0], 'label']!r}; allowed "
                            "0 or 1 (1: the positive outcome)")
        ts = pd.to_datetime(df["time"], utc=True, errors="coerce", format="ISO8601")
        if ts.isna().any():
            i = int(ts.index[ts.isna()][0])
            problems.append(f"time: row {i} holds {df.loc[i, 'time']!r}, not a time "
                            "(ISO 8601)")
        if df["request_id"].isna().any():
            problems.append("request_id: empty in some rows")
    if problems:
        raise DataValidationError(job.file, problems)
    rows = df["row"].astype(int) if "row" in df.columns else pd.Series(0, index=df.index)
    source = job.source or job.file.rsplit("/", 1)[-1]
    entries = [{"request_id": str(r), "labels": [int(y)], "rows": [int(k)],
                "label_ts": t.to_pydatetime(), "source": source}
               for r, y, k, t in zip(df["request_id"], pd.to_numeric(df["label"]), rows, ts)]
    table = traffic.label_table(entries)
    store = log_storage(job)
    day = min(ts).strftime("%Y-%m-%d")
    writer = "import-" + traffic.digest([json.dumps(e, default=str) for e in entries])[:12]
    uri = store.write_bytes(traffic.parquet_bytes(table), traffic.part_path(
        traffic.LABELS, job.model_name, day, writer, 0))
    preds, _ = traffic.read(store, traffic.PREDICTIONS, job.model_name)
    known = set(zip(preds["request_id"], preds["row"]))
    matched = sum((str(r), int(k)) in known for r, k in zip(df["request_id"], rows))
    log(f"{len(df)} labels -> {uri}; {matched} match logged predictions "
        f"({len(df) - matched} not (yet) in the log)")
    return {"part": uri, "labels": len(df), "matched": matched}
