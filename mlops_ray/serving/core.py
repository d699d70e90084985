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
from mlops_ray.config.serve import CacheCfg, DriftCfg, FeedbackCfg, LimitsCfg, PredictionLogCfg
from mlops_ray.errors import RequestInvalid
from mlops_ray.serving.auth import HEALTH, env_keys, key_ok
from mlops_ray.serving.cache import TTLCache, key_of
from mlops_ray.serving.live import ServeMetrics, compare_shadow, pending_entry
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
    prediction_log: PredictionLogCfg = PredictionLogCfg(enabled=False)
    api_keys: list[str] = []
    api_keys_env: str | None = None  # a Serve config file names the variable, never the keys
    admin_keys_env: str | None = None
    feedback_keys_env: str | None = None
    require_keys: bool = False  # bound off loopback without allow_anonymous
    app_name: str | None = None  # the Serve app: names its hub (hub.py)
    push_interval_s: float = 0.25  # how often the replica pushes to the hub


class IngressCore:
    def __init__(self, cfg: dict[str, Any]):
        c = self.cfg = IngressCfg.model_validate(cfg)
        self.name = c.model_name
        self.keys = set(c.api_keys) | env_keys(c.api_keys_env)
        self.scopes = {"api": self.keys, "admin": env_keys(c.admin_keys_env),
                       "feedback": env_keys(c.feedback_keys_env)}
        # no key in any scope: an open server (jobs.serve allows that on loopback only)
        self.open = not any(self.scopes.values())
        if self.open and c.require_keys:
            from mlops_ray.errors import ConfigError
            raise ConfigError("the ingress is bound off loopback but no key is set in "
                              f"{c.api_keys_env or 'serve.auth.api_keys'}, {c.admin_keys_env} or "
                              f"{c.feedback_keys_env}: refusing to serve anybody (set a key, or "
                              "serve.auth.allow_anonymous=true)")
        self.buckets: dict[str, tuple[float, float]] = {}  # feedback rate limit per caller
        self.cache = TTLCache(c.cache.max_entries, c.cache.ttl_s, c.cache.max_bytes) \
            if c.cache.enabled else None
        self.router = Router(c.storage.plain(), inline=c.mode == "inline")
        self.metrics = ServeMetrics(self.name)
        # what this replica saw, pushed to the app's hub (hub.py) every push_interval_s
        self.replica = uuid.uuid4().hex[:12]
        self.outbox: dict[str, Any] = {"versions": {}, "answers": [], "rows": {}}
        self.shadow = {"compared": 0, "label_disagreements": 0, "abs_diff_sum": 0.0}
        self.hub: Any = None
        self._push_task: asyncio.Task | None = None
        self.lookups: dict[str, Any] = {}  # ref -> features.online.OnlineLookup
        self.predlog = None
        if c.prediction_log.enabled:  # every answered record, written off the request path
            from mlops_ray.serving.predlog import PredictionLogger
            self.predlog = PredictionLogger(c.prediction_log.plain(), c.storage.plain(),
                                            self.name, self.replica)

    # --- routing state (user_config) -------------------------------------------------------
    def reconfigure(self, routing: dict[str, Any]) -> None:
        """Load every new arm first; only when all loaded does the routing table change, so a
        version that fails to load never receives traffic (the old routing stays)."""
        try:
            loaded = self.router.load(routing)
            for ref, (sig, _) in loaded.items():
                if sig.get("entity") is not None:
                    # open the online store (Feast's import, its registry, a first read) while
                    # the version loads, not inside the first request's store timeout
                    self._online(ref, sig["entity"]).open()
        except Exception as e:  # noqa: BLE001 - reported through routing_state()
            self.router.load_error = f"{type(e).__name__}: {e}"
            log.error("routing not applied, a version failed to load: %s",
                      self.router.load_error)
            return
        for ref, (_, folder) in loaded.items():
            self.outbox["versions"][ref] = json.loads((folder / "reference.json").read_text())
        self.router.apply(routing, loaded)

    def routing_state(self) -> dict[str, Any]:
        return self.router.state()

    # --- the app's hub: statistics, drift, feedback across every replica ----------------------
    def _hub(self) -> Any:
        if self.hub is None:
            from mlops_ray.serving.hub import hub_for
            c = self.cfg
            self.hub = hub_for(c.app_name or c.model_name, c.model_name, c.drift.plain(),
                               c.feedback.plain())
        return self.hub

    def snapshot(self) -> dict[str, Any]:
        """This replica's cumulative counters and what it saw since its last push."""
        snap = {"arms": {r: a.snapshot() for r, a in self.router.arms.items()},
                "routing": self.router.routing, "pid": os.getpid(),
                "shadow": dict(self.shadow), "cache": self.cache.stats() if self.cache else None,
                **self.outbox}
        self.outbox = {"versions": {}, "answers": [], "rows": {}}
        return snap

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(float(self.cfg.push_interval_s))
            snap = self.snapshot()
            try:
                await self._hub().push.remote(self.replica, snap)
            except Exception as e:  # noqa: BLE001 - the hub restarts; serving goes on
                log.warning("push to the live hub failed: %s", e)
                self.hub = None
                self.outbox["versions"].update(snap["versions"])  # re-sent to a new hub

    def _ensure_push(self) -> None:
        if self._push_task is None:  # started inside Serve's event loop
            self._push_task = asyncio.get_running_loop().create_task(self._push_loop())
            if self.predlog is not None:
                self.predlog.start()

    async def drain(self) -> None:
        """The replica is stopping (Serve drained its requests): write the log's buffer."""
        if self.predlog is not None:
            await self.predlog.close()

    async def stats(self) -> dict[str, Any]:
        """The app's statistics over all its replicas (this one's pushed first)."""
        self._ensure_push()
        await self._hub().push.remote(self.replica, self.snapshot())
        return await self._hub().stats.remote()

    async def drift_table(self) -> dict[str, Any]:
        self._ensure_push()
        await self._hub().push.remote(self.replica, self.snapshot())
        return await self._hub().drift_table.remote()

    async def feedback_labels(self, raw: Any) -> int:
        """Labels of an answered request, whichever replica answered it (through the hub)."""
        self._ensure_push()
        await self._hub().push.remote(self.replica, self.snapshot())
        out = await self._hub().feedback.remote(raw)
        if "accepted" not in out:
            raise RequestInvalid(out["problems"], out["status"])
        if self.predlog is not None:  # the label log: what retraining joins by request id
            self.predlog.feedback(raw["request_id"], raw["labels"])
        return int(out["accepted"])

    # --- requests ------------------------------------------------------------------------------
    def _auth(self, request: Request, scope: str = "api") -> JSONResponse | None:
        """None if the request may go on; else the 401/403 answer. Each scope (predictions,
        admin, feedback) has its own keys; health routes are open."""
        if request.url.path in HEALTH or self.open:
            return None
        keys = self.scopes[scope]
        if key_ok(request.headers.get("authorization", ""), keys):
            return None
        self.metrics.error("unauthorized")
        if not keys:
            return JSONResponse({"error": f"no key is configured for the {scope} routes of this "
                                          "server (serve.auth)"}, status_code=403)
        return JSONResponse({"error": f"missing or wrong {scope} key (Authorization: Bearer "
                                      "<key>)"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    def _rate_limited(self, request: Request) -> JSONResponse | None:
        """A token bucket per caller (its key, else its address) for /feedback."""
        who = request.headers.get("authorization") or (request.client.host if request.client
                                                         else "-")
        rate, burst = float(self.cfg.feedback.rate_per_s), float(self.cfg.feedback.burst)
        now = time.monotonic()
        tokens, t = self.buckets.get(who, (burst, now))
        tokens = min(burst, tokens + (now - t) * rate)
        if tokens < 1:
            self.buckets[who] = (tokens, now)
            self.metrics.error("rate_limited")
            return JSONResponse({"error": f"more than {rate:g} feedback requests per second"},
                                status_code=429, headers={"Retry-After": "1"})
        self.buckets[who] = (tokens - 1, now)
        if len(self.buckets) > 10000:  # forget the oldest callers
            self.buckets.pop(next(iter(self.buckets)))
        return None

    async def _body(self, request: Request) -> Any:
        """The JSON body, read as a stream that stops at the size limit (a chunked body is never
        read whole first); 415 unless it says it is JSON."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestInvalid([f"Content-Type: must be application/json, got "
                                  f"{ctype[:60] or 'none'}"], 415)
        limit = int(self.cfg.limits.max_body_bytes)
        if int(request.headers.get("content-length") or 0) > limit:
            raise RequestInvalid([f"body: larger than {limit} bytes"], 413)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestInvalid([f"body: larger than {limit} bytes"], 413)
        try:
            return json.loads(raw)
        except RecursionError:
            raise RequestInvalid(["body: nested too deeply"], 400) from None
        except ValueError as e:
            raise RequestInvalid([f"body: not JSON ({str(e)[:100]})"]) from None

    def _error(self, e: Exception) -> JSONResponse:
        if isinstance(e, RequestInvalid):
            self.metrics.error("invalid")
            return JSONResponse({"error": str(e), "problems": e.problems}, status_code=e.status)
        rid = uuid.uuid4().hex  # the client quotes it; the log has the details
        if isinstance(e, LookupError):
            log.warning("request %s: %s", rid, e)
            return JSONResponse({"error": "no version is being served", "request_id": rid},
                                status_code=503)
        log.exception("request %s: prediction failed", rid)
        return JSONResponse({"error": "prediction failed", "request_id": rid},
                            status_code=503)

    async def _predict(self, request: Request | None, records_in: Any, endpoint: str
                       ) -> tuple[Arm, dict[str, Any], str]:
        self._ensure_push()
        ab = request.headers.get("x-ab-key") if request is not None else None
        arm, shadow = self.router.choose(ab, records_in if isinstance(records_in, list)
                                         else [{}])
        ref = arm.ref
        entity = self.router.sigs[ref].get("entity")
        if entity is not None and endpoint == "predict":
            # a feature-store model on /predict: records carry the join key only (OIP and gRPC
            # requests are tensors of every input, validated as for any model)
            records_in = await self._online(ref, entity).enrich(
                records_in, int(self.cfg.limits.max_rows))
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
            rows = self.outbox["rows"].setdefault(ref, [])
            if len(rows) < int(self.cfg.drift.window):  # more would not fit the window anyway
                rows.extend(records)
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.requests.inc(tags={**tags, "endpoint": endpoint})
        self.metrics.latency.observe(ms, tags=tags)
        for p in result["probabilities"]:
            self.metrics.prob.observe(p, tags=tags)
        rid = uuid.uuid4().hex
        if self.predlog is not None:
            self.predlog.prediction(rid, ref, self.router.sigs[ref], arm.spec["role"], endpoint,
                                    records, result, ms)
        if len(self.outbox["answers"]) < int(self.cfg.feedback.max_pending):
            self.outbox["answers"].append((rid, pending_entry(ref, self.router.sigs[ref],
                                                              records, result)))
        if shadow is not None:
            asyncio.get_running_loop().create_task(self._shadow(shadow, records, result))
        return arm, result, rid

    def _online(self, ref: str, spec: dict[str, Any]) -> Any:
        if ref not in self.lookups:
            from mlops_ray.features.online import OnlineLookup
            self.lookups[ref] = OnlineLookup(spec)
        return self.lookups[ref]

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
        compare_shadow(self.shadow, got, answer)
