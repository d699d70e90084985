"""Routing and rollout arms: which registry versions the ingress serves, with what weight and
role (stable, canary, A/B arm, shadow), and which one answers a request.

The routing table arrives as the ingress's `user_config`. A new version is fetched (hash-checked)
and loaded before the table changes, so a version that fails to load never gets traffic.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from pathlib import Path
from typing import Any

from mlops_ray.serving.faults import maybe_fail


class Arm:
    """Live statistics of one routed version (what rollout decisions read)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.requests = self.errors = self.rows = 0
        self.latency_ms: deque[float] = deque(maxlen=2000)
        self.probs: deque[float] = deque(maxlen=5000)

    @property
    def ref(self) -> str:
        return self.spec["ref"]

    def answered(self, seconds: float, rows: int, probabilities: list[float]) -> None:
        self.latency_ms.append(seconds * 1000)
        self.rows += rows
        self.probs.extend(probabilities)

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counters and the recent samples, as pushed to the app's hub."""
        return {"spec": self.spec, "requests": self.requests, "errors": self.errors,
                "rows": self.rows, "latency_ms": list(self.latency_ms)[-500:],
                "probs": list(self.probs)[-1000:]}


def fetch(artifact_uri: str, content_hash: str, storage_cfg: dict[str, Any]) -> Path:
    from mlops_ray.registry.artifact import fetch as fetch_artifact
    from mlops_ray.storage import from_cfg
    return fetch_artifact(artifact_uri, content_hash, from_cfg(storage_cfg))


class Router:
    """The routed versions: their arms, signatures and (inline mode) loaded predictors, or
    (handle mode) handles to each version's own Serve app."""

    def __init__(self, storage_cfg: dict[str, Any], inline: bool):
        self.storage_cfg, self.inline = storage_cfg, inline
        self.arms: dict[str, Arm] = {}  # ref -> Arm
        self.sigs: dict[str, dict] = {}
        self.predictors: dict[str, Any] = {}
        self.handles: dict[str, Any] = {}
        self.routing: dict[str, Any] = {"arms": [], "mode": "weighted"}
        self.load_error: str | None = None

    def load(self, routing: dict[str, Any]) -> dict[str, tuple[dict, Path]]:
        """Fetch and load every arm not loaded yet: {ref: (signature, folder)}. Raises when
        one fails (the table is left as it was)."""
        from ray import serve

        from mlops_ray.artifacts.predictor import Predictor
        loaded: dict[str, tuple[dict, Path]] = {}
        for spec in routing["arms"]:
            ref = spec["ref"]
            if ref in self.sigs:
                continue
            folder = fetch(spec["artifact_uri"], spec["content_hash"], self.storage_cfg)
            if self.inline:
                self.predictors[ref] = Predictor.load(folder, ref)
            else:
                self.handles[ref] = serve.get_deployment_handle("Model", app_name=spec["app"])
            loaded[ref] = (json.loads((folder / "signature.json").read_text()), folder)
        return loaded

    def apply(self, routing: dict[str, Any], loaded: dict[str, tuple[dict, Path]]) -> None:
        """Switch to `routing` (every arm loaded): arms kept keep their statistics."""
        for ref, (sig, _) in loaded.items():
            self.sigs[ref] = sig
        for spec in routing["arms"]:
            arm = self.arms.get(spec["ref"])
            if arm is None:
                self.arms[spec["ref"]] = Arm(spec)
            else:
                arm.spec = spec
        live = {s["ref"] for s in routing["arms"]}
        for ref in list(self.arms):
            if ref not in live:
                del self.arms[ref]
        self.routing, self.load_error = routing, None

    def state(self) -> dict[str, Any]:
        return {**self.routing, "load_error": self.load_error}

    def ready(self) -> bool:
        return any(a.spec["role"] != "shadow" for a in self.arms.values())

    def stable(self) -> Arm:
        arms = sorted(self.arms.values(), key=lambda a: a.spec["role"] != "stable")
        if not arms:
            raise LookupError("no version is routed")
        return arms[0]

    def choose(self, ab_header: str | None, records: list[dict]) -> tuple[Arm, Arm | None]:
        """The arm that answers (weighted; sticky by key for A/B) and the shadow, if any."""
        serving = [a for a in self.arms.values() if a.spec["role"] != "shadow"]
        if not serving:
            raise LookupError("no version is routed")
        shadow = next((a for a in self.arms.values() if a.spec["role"] == "shadow"), None)
        if len(serving) == 1:
            return serving[0], shadow
        if self.routing.get("mode") == "ab":  # sticky: the same key always gets the same arm
            key = ab_header or str(records[0].get(
                self.routing.get("ab_key") or "", "")) or json.dumps(records[0], sort_keys=True)
            u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        else:
            u = random.random()
        total = sum(a.spec["weight"] for a in serving) or 1.0
        acc = 0.0
        for a in serving:
            acc += a.spec["weight"] / total
            if u < acc:
                return a, shadow
        return serving[-1], shadow

    async def infer(self, arm: Arm, records: list[dict]) -> dict[str, Any]:
        ref = arm.ref
        if not self.inline:
            return await self.handles[ref].predict.remote(records)
        maybe_fail(arm.spec.get("chaos_error_rate"), ref)
        p, y = self.predictors[ref].predict_records(records)
        return {"probabilities": p.tolist(), "labels": y.tolist()}
