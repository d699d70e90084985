"""The live state of one Serve app, cluster-wide: one detached actor per app
(`mlops-live-<app>`, namespace `mlops_ray`). Every ingress replica pushes what it saw every
`serve.live.push_interval_s` (its per-version counters and recent samples, new drift rows, the
answers waiting for labels); statistics, drift tables, alerts, feedback and live quality are read
here, so a rollout decision, `action=status` or the monitor sees all of the app's traffic
however many ingress replicas serve it.

Replicas push snapshots of their cumulative counters (a lost push costs nothing) and the new
rows and answers since their last push (a lost push loses those samples, never counts twice).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

NAMESPACE = "mlops_ray"
STALE_S = 60.0  # a replica that has not pushed for this long no longer counts (it is gone)


def hub_name(app: str) -> str:
    return f"mlops-live-{app}"


class LiveHub:
    """The actor (started by `hub_for`); its methods are what replicas and control call."""

    def __init__(self, model: str, drift_cfg: dict[str, Any], feedback_cfg: dict[str, Any]):
        from mlops_ray.serving.live import LiveState, ServeMetrics
        self.live = LiveState(model, drift_cfg, feedback_cfg, ServeMetrics(model))
        self.replicas: dict[str, dict[str, Any]] = {}  # replica id -> its latest snapshot
        self.routing: dict[str, Any] = {"arms": []}
        self._drift: asyncio.Task | None = None

    def _fresh(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [s for s in self.replicas.values() if now - s["t"] <= STALE_S]

    def _routed(self) -> set[str]:
        return {a["ref"] for a in self.routing.get("arms", [])}

    async def push(self, replica: str, snap: dict[str, Any]) -> None:
        if self._drift is None:
            self._drift = asyncio.get_running_loop().create_task(
                self.live.drift_loop(self._routed))
        for ref, reference in snap.pop("versions", {}).items():
            if ref not in self.live.drift:
                self.live.add_version(ref, reference)
        for rid, entry in snap.pop("answers", []):
            self.live.remember(rid, entry)
        for ref, rows in snap.pop("rows", {}).items():
            if ref in self.live.drift:
                self.live.drift[ref].add(rows)
        if snap.get("routing"):
            self.routing = snap["routing"]
        self.replicas[replica] = {**snap, "t": time.monotonic()}

    def stats(self) -> dict[str, Any]:
        """Per-version statistics over every replica, as the rollout rules read them."""
        from scipy.stats import ks_2samp
        reps = self._fresh()
        arms: dict[str, dict[str, Any]] = {}
        samples: dict[str, tuple[list[float], list[float]]] = {}
        for rep in reps:
            for ref, a in rep.get("arms", {}).items():
                if ref not in self._routed():
                    continue
                agg = arms.setdefault(ref, {"requests": 0, "errors": 0, "rows": 0})
                agg.update(version=a["spec"]["version"], role=a["spec"]["role"],
                           weight=a["spec"]["weight"])
                for k in ("requests", "errors", "rows"):
                    agg[k] += a[k]
                lat, probs = samples.setdefault(ref, ([], []))
                lat += a["latency_ms"]
                probs += a["probs"]
        for ref, agg in arms.items():
            ms = np.asarray(samples[ref][0], float)
            probs = samples[ref][1]
            agg.update(error_rate=agg["errors"] / agg["requests"] if agg["requests"] else 0.0,
                       p50_ms=float(np.percentile(ms, 50)) if len(ms) else None,
                       p99_ms=float(np.percentile(ms, 99)) if len(ms) else None,
                       mean_probability=float(np.mean(probs)) if probs else None)
        stable = next((r for r, a in arms.items() if a["role"] == "stable"), None)
        for ref, agg in arms.items():  # is an arm's prediction distribution the stable one's?
            if stable and ref != stable and min(len(samples[ref][1]),
                                                len(samples[stable][1])) >= 20:
                agg["shift_p"] = float(ks_2samp(samples[ref][1], samples[stable][1]).pvalue)
        shadow = {"compared": 0, "label_disagreements": 0, "abs_diff_sum": 0.0}
        cache = {"entries": 0, "bytes": 0, "hits": 0, "misses": 0}
        for rep in reps:
            for k in shadow:
                shadow[k] += rep.get("shadow", {}).get(k, 0)
            for k in cache:
                cache[k] += (rep.get("cache") or {}).get(k, 0)
        return {"routing": self.routing, "arms": arms, "replicas": len(reps),
                "pid": sorted(rep["pid"] for rep in reps), "shadow": shadow,
                "cache": cache if any(rep.get("cache") for rep in reps) else None,
                "feedback": self.live.live_quality()}

    def drift_table(self) -> dict[str, Any]:
        return self.live.drift_table(self._routed())

    async def feedback(self, raw: Any, wait_s: float = 1.0) -> dict[str, Any]:
        """Labels of an answered request, from whichever replica answered it: the asking
        replica pushed its own answers just before; another replica's may still be on the way
        (waited for up to `wait_s`). {"accepted": n} or the 4xx."""
        from mlops_ray.errors import RequestInvalid
        deadline = time.monotonic() + (wait_s if len(self._fresh()) > 1 else 0.0)
        while True:
            try:
                return {"accepted": self.live.feedback(raw)}
            except RequestInvalid as e:
                if e.status != 404 or time.monotonic() > deadline:
                    return {"error": str(e), "problems": e.problems, "status": e.status}
            await asyncio.sleep(0.05)


def hub_for(app: str, model: str, drift_cfg: dict[str, Any], feedback_cfg: dict[str, Any],
            fresh: bool = False) -> Any:
    """The app's hub actor, started if needed (`fresh`: a new one, for an app deployed anew)."""
    import ray
    if fresh and (old := find_hub(app)) is not None:
        ray.kill(old)
        deadline = time.monotonic() + 30
        while find_hub(app) is not None and time.monotonic() < deadline:
            time.sleep(0.1)  # the name is released once the old actor is dead
    actor = ray.remote(num_cpus=0, max_restarts=-1)(LiveHub)
    return actor.options(name=hub_name(app), namespace=NAMESPACE, lifetime="detached",
                         get_if_exists=True).remote(model, drift_cfg, feedback_cfg)


def find_hub(app: str) -> Any | None:
    import ray
    try:
        return ray.get_actor(hub_name(app), namespace=NAMESPACE)
    except ValueError:
        return None
