"""Live state of the served versions: the Ray metrics the ingress publishes, drift windows
against each version's training reference (checked off the request path, alerting by log,
gauge and webhook), delayed-label feedback for live AUC and group gaps, and the shadow
comparisons. Kept by the app's hub (hub.py), which every ingress replica feeds."""
from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from mlops_ray.errors import RequestInvalid

log = logging.getLogger("ray.serve")


def _post(url: str, payload: dict[str, Any]) -> None:
    import urllib.request
    if not url.startswith(("http://", "https://")):  # also checked in the config
        log.warning("drift webhook %r: only http(s) URLs are called", url)
        return
    try:
        req = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(),
                                     headers={"Content-Type": "application/json"})
        # the scheme is checked above (bandit B310: no file:// or custom schemes)
        urllib.request.urlopen(req, timeout=5).read()  # nosec B310
    except OSError as e:
        log.warning("drift webhook %s failed: %s", url, e)


def pending_entry(ref: str, sig: dict[str, Any], records: list[dict], result: dict
                  ) -> dict[str, Any]:
    """What a request's labels are joined with later: its answer and its sensitive groups."""
    attrs = [f["name"] for f in sig["inputs"] if f.get("role") == "sensitive"]
    return {"ref": ref, "p": result["probabilities"], "y_pred": result["labels"],
            "groups": {a: [r.get(a) for r in records] for a in attrs}}


def compare_shadow(s: dict[str, Any], got: dict, answer: dict) -> None:
    """Count a shadow answer against the one the client got."""
    s["compared"] += len(got["labels"])
    s["label_disagreements"] += sum(a != b for a, b in zip(got["labels"], answer["labels"]))
    s["abs_diff_sum"] += float(np.abs(np.subtract(got["probabilities"],
                                                  answer["probabilities"])).sum())


class ServeMetrics:
    """`ray_mlops_serve_*` on Ray's metrics endpoint (the dashboard, Prometheus)."""

    def __init__(self, model: str) -> None:
        from mlops_ray.metrics import metric
        self.model = model
        self.requests, self.errors = metric("mlops_serve_requests"), metric("mlops_serve_errors")
        self.latency, self.cache = metric("mlops_serve_latency_ms"), metric("mlops_serve_cache")
        self.prob, self.drift = metric("mlops_serve_probability"), metric("mlops_serve_drift")
        self.alert, self.live_auc = metric("mlops_serve_drift_alert"), \
            metric("mlops_serve_live_auc")

    def error(self, kind: str, version: str = "-") -> None:
        self.errors.inc(tags={"model": self.model, "version": version, "kind": kind})


class LiveState:
    def __init__(self, model: str, drift_cfg: dict[str, Any], feedback_cfg: dict[str, Any],
                 metrics: ServeMetrics) -> None:
        self.model, self.drift_cfg, self.feedback_cfg = model, drift_cfg, feedback_cfg
        self.m = metrics
        self.drift: dict[str, Any] = {}  # ref -> DriftMonitor
        self.pending: OrderedDict[str, dict] = OrderedDict()  # request_id -> rows, for feedback
        self.pending_rows = 0
        self.labelled: dict[str, dict[str, deque]] = {}  # ref -> feedback windows
        self.alerted: set[str] = set()

    def add_version(self, ref: str, reference: dict[str, Any]) -> None:
        from mlops_ray.evaluation.drift import DriftMonitor
        self.drift[ref] = DriftMonitor(reference, self.drift_cfg)

    # --- requests ---------------------------------------------------------------------------
    def remember(self, rid: str, entry: dict[str, Any]) -> None:
        """Keep a request's answer (`pending_entry`) until its labels arrive."""
        self.pending[rid] = entry
        self.pending_rows += len(entry["p"])
        # bounded in requests and rows: the oldest unanswered ones go first
        while len(self.pending) > int(self.feedback_cfg["max_pending"]) or \
                self.pending_rows > int(self.feedback_cfg.get("max_pending_rows", 200000)):
            self.pending_rows -= len(self.pending.popitem(last=False)[1]["p"])

    # --- feedback -----------------------------------------------------------------------------
    def feedback(self, raw: Any) -> int:
        """Labels for an answered request; the number accepted. RequestInvalid otherwise."""
        if not isinstance(raw, dict):
            raise RequestInvalid(["body: must be an object"])
        rid, labels = raw.get("request_id"), raw.get("labels")
        rec = self.pending.pop(rid, None) if isinstance(rid, str) else None
        if rec is None:
            raise RequestInvalid([f"request_id={str(rid)[:64]!r}: unknown or expired"], 404)
        if not (isinstance(labels, list) and len(labels) == len(rec["p"])
                and all(v in (0, 1) and not isinstance(v, bool) for v in labels)):
            self.pending[str(rid)] = rec  # rid is the str rec was popped under
            raise RequestInvalid([f"labels: must be {len(rec['p'])} values of 0/1"])
        self.pending_rows -= len(rec["p"])
        n = int(self.feedback_cfg["window"])
        fb = self.labelled.setdefault(rec["ref"], {k: deque(maxlen=n)
                                                   for k in ("y", "p", "y_pred")})
        fb["y"].extend(labels)
        fb["p"].extend(rec["p"])
        fb["y_pred"].extend(rec["y_pred"])
        for attr, vals in rec["groups"].items():
            fb.setdefault(f"g:{attr}", deque(maxlen=n)).extend(vals)
        return len(labels)

    def live_quality(self) -> dict[str, Any]:
        from mlops_ray.evaluation.stats import roc_auc
        out = {}
        for ref, fb in self.labelled.items():
            y, p = np.fromiter(fb["y"], float), np.fromiter(fb["p"], float)
            d: dict[str, Any] = {"labelled_rows": len(y)}
            if len(set(y)) == 2:
                d["auc"] = float(roc_auc(y, p))
                self.m.live_auc.set(d["auc"], tags={"model": self.model,
                                                    "version": ref.split(":")[-1]})
            yp = np.fromiter(fb["y_pred"], float)
            for attr in [k for k in fb if k.startswith("g:")]:
                g = np.array(list(fb[attr]), dtype=object)
                tprs = {str(v): float(yp[(g == v) & (y == 1)].mean()) for v in set(g)
                        if v is not None and ((g == v) & (y == 1)).sum() >= 10}
                if len(tprs) >= 2:
                    d[f"tpr_gap_{attr[2:]}"] = max(tprs.values()) - min(tprs.values())
            out[ref] = d
        return out

    # --- drift --------------------------------------------------------------------------------
    def drift_table(self, live: set[str]) -> dict[str, Any]:
        return {ref: mon.table() for ref, mon in self.drift.items() if ref in live}

    async def drift_loop(self, live: Any) -> None:
        """Every check_interval_s: drift tables off the request path (a worker thread, on a
        snapshot of the windows), gauges, and an alert (log line, metric, webhook) when a
        feature starts drifting. `live()`: the refs routed now."""
        loop = asyncio.get_running_loop()
        seen: dict[str, int] = {}
        while True:
            await asyncio.sleep(float(self.drift_cfg["check_interval_s"]))
            for ref, mon in list(self.drift.items()):
                if ref not in live() or seen.get(ref) == mon.added:
                    continue
                seen[ref] = mon.added
                try:
                    rows = await loop.run_in_executor(None, mon.table, mon.snapshot())
                    self.publish(ref, rows)
                except Exception:  # noqa: BLE001 - monitoring must never stop serving
                    log.exception("drift check of %s failed", ref)

    def publish(self, ref: str, rows: list[dict[str, Any]]) -> None:
        version = ref.split(":")[-1]
        for row in rows:
            if "alert" not in row:
                continue
            tags = {"model": self.model, "version": version, "feature": row["feature"]}
            self.m.drift.set(row.get("psi", row.get("js", 0.0)), tags=tags)
            self.m.alert.set(1.0 if row["alert"] else 0.0, tags=tags)
            key = f"{ref}/{row['feature']}"
            if row["alert"] and key not in self.alerted:
                self.alerted.add(key)
                log.warning("DRIFT ALERT %s feature %s: %s", ref, row["feature"], row)
                url = self.drift_cfg.get("webhook_url")
                if url:
                    asyncio.get_running_loop().run_in_executor(None, _post, url, {
                        "alert": "drift", "model": self.model, "version": ref, **row})
            elif not row["alert"]:
                self.alerted.discard(key)
