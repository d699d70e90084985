"""Every metric the project publishes on Ray's metrics endpoint, in one catalog.

Ray exports a custom metric `mlops_x` as `ray_mlops_x` in Prometheus text format on each
node's metrics agent (histograms as `_bucket`, `_count`, `_sum`). The Grafana dashboard and the
Prometheus alert rules under `observability/` use these names only; a test checks that every
name they use is in this catalog and is found by a real Prometheus scraping a local Ray.

Emitters call `metric(name)`, never `ray.util.metrics` directly, so nothing is published that
the catalog (and the dashboard) does not know of.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class Spec(NamedTuple):
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


_MV = ("model", "version")
CATALOG: dict[str, Spec] = {
    # serving: the ingress (core.py) and its hub (hub.py / live.py)
    "mlops_serve_requests": Spec("counter", "requests answered", (*_MV, "endpoint")),
    "mlops_serve_errors": Spec("counter", "failed requests by kind", (*_MV, "kind")),
    "mlops_serve_latency_ms": Spec("histogram", "request latency (ms)", _MV,
                                   (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)),
    "mlops_serve_cache": Spec("counter", "cache lookups", ("model", "result")),
    "mlops_serve_probability": Spec("histogram", "predicted probabilities", _MV,
                                    tuple(round(0.1 * i, 1) for i in range(1, 10))),
    "mlops_serve_batch_rows": Spec("histogram", "rows per model batch (handle mode)",
                                   ("version",), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
    "mlops_serve_drift": Spec("gauge", "per-feature drift (PSI or JS)", (*_MV, "feature")),
    "mlops_serve_drift_alert": Spec("gauge", "1 while a feature drifts", (*_MV, "feature")),
    "mlops_serve_live_auc": Spec("gauge", "AUC on labelled feedback (the hub's window)", _MV),
    # the prediction log (serving/predlog.py)
    "mlops_predlog_rows": Spec("counter", "rows written to the prediction or label log",
                               ("model", "log")),
    "mlops_predlog_dropped": Spec("counter", "rows not logged (reason buffer_full: writes failed or lagged until the buffer was full)",
                                  ("model", "reason")),
    "mlops_predlog_lag_seconds": Spec("gauge", "age of the oldest answered row not yet "
                                      "written to the log (0: all written)", ("model",)),
    # live gates on logged, labelled traffic (pipeline/monitor.py)
    "mlops_live_gate_ok": Spec("gauge", "1 while the gate passes on live labelled traffic, "
                               "0 while it would fail", (*_MV, "gate")),
    "mlops_live_metric": Spec("gauge", "a gate metric measured on live labelled traffic",
                              (*_MV, "metric")),
    "mlops_live_labelled_rows": Spec("gauge", "labelled traffic rows the live gates judged",
                                     _MV),
    # rollouts (serving/rollout.py)
    "mlops_rollout_canary_percent": Spec("gauge", "traffic share of the version being rolled "
                                         "out (0 after a rollback)", _MV),
    "mlops_rollout_events": Spec("counter", "rollouts by outcome (promoted, rolled_back)",
                                 ("model", "outcome")),
    # training (train/session.py): rank 0 of each run
    "mlops_train_samples_per_second": Spec("gauge", "training samples per second in the last "
                                           "epoch", ("run",)),
    "mlops_train_epoch_seconds": Spec("gauge", "wall time of the last epoch", ("run",)),
    "mlops_train_checkpoint_seconds": Spec("gauge", "wall time of the last checkpoint save and "
                                           "upload", ("run",)),
    "mlops_train_epoch": Spec("gauge", "epochs completed", ("run",)),
    "mlops_train_preemptions_survived": Spec("gauge", "restarts from a just-in-time "
                                             "(preemption) checkpoint", ("run",)),
    "mlops_train_restarts": Spec("gauge", "restarts of the worker group (failures and "
                                 "preemptions)", ("run",)),
    # stream ingestion into the feature store (features/stream.py, the consumer actor)
    "mlops_features_freshness_seconds": Spec("histogram", "event's XADD to the stream -> in "
                                             "both stores and acknowledged (s)",
                                             ("project", "view"),
                                             (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)),
    "mlops_features_events": Spec("counter", "stream events applied to the feature store",
                                  ("project", "view")),
    "mlops_features_lag_seconds": Spec("gauge", "age of the oldest stream event not yet "
                                       "applied (0: caught up)", ("project",)),
    # tuning (tune/callbacks.py)
    "mlops_tune_trials": Spec("gauge", "trials of the study by state", ("study", "state")),
    "mlops_tune_best": Spec("gauge", "best reported value of the tuned metric", ("study",)),
}

_made: dict[str, Any] = {}


def metric(name: str) -> Any:
    """The Ray metric object of a catalog entry (one per process)."""
    if name not in _made:
        from ray.util import metrics
        s = CATALOG[name]
        if s.kind == "counter":
            _made[name] = metrics.Counter(name, s.description, tag_keys=s.tags)
        elif s.kind == "gauge":
            _made[name] = metrics.Gauge(name, s.description, tag_keys=s.tags)
        else:
            _made[name] = metrics.Histogram(name, s.description, boundaries=list(s.boundaries),
                                            tag_keys=s.tags)
    return _made[name]


def exported_names(name: str) -> list[str]:
    """The Prometheus series names of a catalog entry, as Ray 2.60's metrics agent exports
    them (seen on a local Ray's scrape): counters with a `_total` suffix, histograms as
    `_bucket`/`_count`/`_sum`, gauges as they are."""
    base, kind = f"ray_{name}", CATALOG[name].kind
    if kind == "histogram":
        return [f"{base}_bucket", f"{base}_count", f"{base}_sum"]
    if kind == "counter":
        return [f"{base}_total"]
    return [base]


def record_every_metric(tags_value: str = "catalog-check") -> None:
    """Record one sample of every catalog metric (used by the scrape test and by
    `make dashboards`' self-check): what Prometheus sees is then exactly the catalog."""
    for name, s in CATALOG.items():
        m, tags = metric(name), {k: tags_value for k in s.tags}
        if s.kind == "counter":
            m.inc(1, tags=tags)
        elif s.kind == "gauge":
            m.set(1.0, tags=tags)
        else:
            m.observe(1.0, tags=tags)
