"""The ingress's core, shared by its REST and gRPC faces: request validation against the
routed version's signature, the response cache, routing (router.py), inference, the live state
(live.py) and the per-arm statistics rollouts read. No transport here."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from mlops_ray.config.base import StorageCfg, Strict
from mlops_ray.config.serve import CacheCfg, DriftCfg, FeedbackCfg, LimitsCfg
from mlops_ray.errors import RequestInvalid
from mlops_ray.serving.auth import HEALTH, bearer_ok, env_keys
from mlops_ray.serving.cache import TTLCache, key_of
from mlops_ray.serving.live import LiveState, ServeMetrics
from mlops_ray.serving.router import Arm, Router
from mlops_ray.serving.schema import validate_records

log = logging.getLogger("ray.serve")


class IngressCfg(Strict):
    """The ingress's init arguments (a plain dict across Serve; validated in the replica)."""
    model_name: str
    mode: str = "inline"  # inline: versions run here; handle: each in its own Serve app
    storage: StorageCfg = StorageCfg()
    cache: CacheCfg = CacheCfg()
    limits: LimitsCfg = LimitsCfg()
    drift: DriftCfg = DriftCfg()
    feedback: FeedbackCfg = FeedbackCfg()
    api_keys: list[str] = []
    api_keys_env: str | None = None  # a Serve config file names the variable, never the keys


class IngressCore:
    def __init__(self, cfg: dict[str, Any]):
        c = self.cfg = IngressCfg.model_validate(cfg)
        self.name = c.model_name
        self.keys = set(c.api_keys) | env_keys(c.api_keys_env)
        self.cache = TTLCache(c.cache.max_entries, c.cache.ttl_s) if c.cache.enabled else None
        self.router = Router(c.storage.plain(), inline=c.mode == "inline")
        self.metrics = ServeMetrics(self.name)
        self.live = LiveState(self.name, c.drift.plain(), c.feedback.plain(), self.metrics)
        self._drift_task: asyncio.Task | None = None

    # --- routing state (user_config) -------------------------------------------------------
    def reconfigure(self, routing: dict[str, Any]) -> None:
        """Load every new arm first; only when all loaded does the routing table change, so a
        version that fails to load never receives traffic (the old routing stays)."""
        try:
            loaded = self.router.load(routing)
        except Exception as e:  # noqa: BLE001 - reported through routing_state()
            self.router.load_error = f"{type(e).__name__}: {e}"
            log.error("routing not applied, a version failed to load: %s",
                      self.router.load_error)
            return
        for ref, (_, folder) in loaded.items():
            self.live.add_version(ref, json.loads((folder / "reference.json").read_text()))
        self.router.apply(routing, loaded)

    def routing_state(self) -> dict[str, Any]:
        return self.router.state()

    def stats(self) -> dict[str, Any]:
        from scipy.stats import ks_2samp
        arms = {r: a.summary() for r, a in self.router.arms.items()}
        stable = next((a for a in self.router.arms.values() if a.spec["role"] == "stable"), None)
        for ref, a in self.router.arms.items():  # is an arm's prediction distribution another?
            if a is not stable and stable is not None and min(len(a.probs),
                                                              len(stable.probs)) >= 20:
                arms[ref]["shift_p"] = float(ks_2samp(a.probs, stable.probs).pvalue)
        return {"routing": self.router.routing, "arms": arms, "pid": os.getpid(),
                "shadow": dict(self.live.shadow),
                "cache": self.cache.stats() if self.cache else None,
                "feedback": self.live.live_quality()}

    def drift_table(self) -> dict[str, Any]:
        return self.live.drift_table(set(self.router.arms))

    # --- requests ------------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        if request.url.path in HEALTH or bearer_ok(request.headers.get("authorization", ""),
                                                   self.keys):
            return None
        self.metrics.error("unauthorized")
        return JSONResponse({"error": "missing or wrong API key (Authorization: Bearer <key>)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> Any:
        limit = int(self.cfg.limits.max_body_bytes)
        if int(request.headers.get("content-length") or 0) > limit:
            raise RequestInvalid([f"body: larger than {limit} bytes"], 413)
        raw = await request.body()
        if len(raw) > limit:
            raise RequestInvalid([f"body: larger than {limit} bytes"], 413)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RequestInvalid([f"body: not JSON ({e})"]) from None

    def _error(self, e: Exception) -> JSONResponse:
        if isinstance(e, RequestInvalid):
            self.metrics.error("invalid")
            return JSONResponse({"error": str(e), "problems": e.problems}, status_code=e.status)
        if isinstance(e, LookupError):
            return JSONResponse({"error": str(e)}, status_code=503)
        log.exception("prediction failed")
        return JSONResponse({"error": f"prediction failed: {type(e).__name__}: {e}"},
                            status_code=503)

    async def _predict(self, request: Request | None, records_in: Any, endpoint: str
                       ) -> tuple[Arm, dict[str, Any], str]:
        if self._drift_task is None:  # started with the first request, inside Serve's loop
            self._drift_task = asyncio.get_running_loop().create_task(
                self.live.drift_loop(lambda: set(self.router.arms)))
        ab = request.headers.get("x-ab-key") if request is not None else None
        arm, shadow = self.router.choose(ab, records_in if isinstance(records_in, list)
                                         else [{}])
        ref = arm.ref
        records = validate_records(records_in, self.router.sigs[ref],
                                   int(self.cfg.limits.max_rows),
                                   self.cfg.limits.unknown_categories)
        tags = {"model": self.name, "version": str(arm.spec["version"])}
        t0 = time.perf_counter()
        key = key_of(ref, records) if self.cache else ""  # used only with a cache
        result = self.cache.get(key) if self.cache else None
        if self.cache:
            self.metrics.cache.inc(tags={"model": self.name,
                                         "result": "hit" if result else "miss"})
        arm.requests += 1  # answered by this arm, from its cache or its model
        if result is None:
            try:
                result = await self.router.infer(arm, records)
            except Exception:
                arm.errors += 1
                self.metrics.error("model", tags["version"])
                raise
            if self.cache:
                self.cache.put(key, result)
            arm.answered(time.perf_counter() - t0, len(records), result["probabilities"])
            self.live.drift[ref].add(records)
        self.metrics.requests.inc(tags={**tags, "endpoint": endpoint})
        self.metrics.latency.observe((time.perf_counter() - t0) * 1000, tags=tags)
        for p in result["probabilities"]:
            self.metrics.prob.observe(p, tags=tags)
        rid = uuid.uuid4().hex
        self.live.remember(rid, ref, self.router.sigs[ref], records, result)
        if shadow is not None:
            asyncio.get_running_loop().create_task(self._shadow(shadow, records, result))
        return arm, result, rid

    async def _shadow(self, arm: Arm, records: list[dict], answer: dict) -> None:
        """The challenger sees a copy; its answer is compared and logged, never returned."""
        arm.requests += 1
        t0 = time.perf_counter()
        try:
            got = await self.router.infer(arm, records)
        except Exception as e:  # noqa: BLE001 - a failing shadow must never affect clients
            arm.errors += 1
            log.warning("shadow %s failed: %s", arm.ref, e)
            return
        arm.answered(time.perf_counter() - t0, len(records), got["probabilities"])
        self.live.compare_shadow(got, answer)
