"""The Serve deployments.

    HTTP :8000 ──> Ingress app "<model>" (FastAPI: /predict, OIP v2, /feedback, /admin/*)
                     │ routing table (user_config): weighted canary | sticky A/B | shadow
                     ├──> app "<model>-v3"  ModelServer (registry version 3, @serve.batch)
                     └──> app "<model>-v4"  ModelServer (registry version 4)

One Serve application per live version, so a new version starts (and is checked ready) without
touching the running ones, and moving traffic is a `user_config` change of the ingress: no
replica restarts. The ingress validates every request against the version's input signature
(422 naming every bad field; never a 5xx, never a bad row in a replica), caches answers per
version, keeps per-arm statistics for rollout decisions, watches drift against the version's
training reference and joins delayed labels for live AUC and fairness gaps.
"""
# no `from __future__ import annotations`: FastAPI must see real types through Serve's ingress

import asyncio
import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from mlops_ray.serving.cache import TTLCache, key_of
from mlops_ray.serving.schema import RequestInvalid, oip_metadata, oip_to_records, validate_records

log = logging.getLogger("ray.serve")
HEALTH = {"/health", "/v2/health/live", "/v2/health/ready"}


def _load(artifact_uri: str, content_hash: str, storage_cfg: dict[str, Any]) -> Any:
    from mlops_ray.registry.artifact import fetch
    from mlops_ray.storage import from_cfg
    return fetch(artifact_uri, content_hash, from_cfg(storage_cfg))


def _post(url: str, payload: dict[str, Any]) -> None:
    import urllib.request
    try:
        req = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()
    except OSError as e:
        log.warning("drift webhook %s failed: %s", url, e)


@serve.deployment(name="Model", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25},
                  max_surge_percent=100)
class ModelServer:
    """One registry version: hash-checked on load, saved preprocessing, batched inference."""

    def __init__(self, artifact_uri: str, content_hash: str, ref: str,
                 storage_cfg: dict[str, Any], batching: dict[str, Any]):
        from ray.util import metrics

        from mlops_ray.serving.predictor import Predictor
        self.p = Predictor.load(_load(artifact_uri, content_hash, storage_cfg), ref)
        self.ref = ref
        # @serve.batch adds these setters at runtime; its typing omits them
        self.predict_batch.set_max_batch_size(  # type: ignore[attr-defined]
            int(batching["max_batch_size"]))
        self.predict_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            float(batching["batch_wait_timeout_s"]))
        self.chaos_error_rate = 0.0
        self.batch_rows = metrics.Histogram(
            "mlops_serve_batch_rows", description="rows per model batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512], tag_keys=("version",))

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        # fault injection for rollout drills: a share of requests fails on this version
        self.chaos_error_rate = float((cfg or {}).get("chaos_error_rate", 0.0))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def predict_batch(self, requests: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        sizes = [len(r) for r in requests]
        p, y = self.p.predict_records([row for r in requests for row in r])
        self.batch_rows.observe(len(p), tags={"version": self.ref})
        out, i = [], 0
        for n in sizes:
            out.append({"probabilities": p[i:i + n].tolist(), "labels": y[i:i + n].tolist()})
            i += n
        return out

    async def predict(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        if self.chaos_error_rate and random.random() < self.chaos_error_rate:
            raise RuntimeError(f"injected failure on {self.ref} (chaos_error_rate)")
        return await self.predict_batch(records)


# ------------------------------------------------------------------------------------ ingress
api = FastAPI(title="mlops_ray model server",
              description="Predictions of registry versions: plain JSON and the Open Inference "
                          "Protocol v2. Non-health endpoints need `Authorization: Bearer <key>` "
                          "when API keys are configured.")


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body from a pydantic model, for the docs only: the handlers read the raw
    body once and validate it against the version's signature (no second parse by FastAPI)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(ref_template="#/$defs/{model}")}}}}


class PredictRequest(BaseModel):
    records: list[dict[str, Any]] = Field(..., description="one object per row: column -> value")


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor]


class FeedbackRequest(BaseModel):
    request_id: str
    labels: list[int] = Field(..., description="true labels (0/1) of the request's rows")


class Arm:
    """Live statistics of one routed version (what rollout decisions read)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.requests = self.errors = self.rows = 0
        self.latency_ms: deque[float] = deque(maxlen=2000)
        self.probs: deque[float] = deque(maxlen=5000)

    def summary(self) -> dict[str, Any]:
        lat = np.fromiter(self.latency_ms, float)
        return {"version": self.spec["version"], "role": self.spec["role"],
                "weight": self.spec["weight"], "requests": self.requests, "errors": self.errors,
                "rows": self.rows, "error_rate": self.errors / self.requests if self.requests else 0.0,
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                "mean_probability": float(np.mean(self.probs)) if self.probs else None}


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25},
                  max_surge_percent=100)
@serve.ingress(api)
class Ingress:
    def __init__(self, cfg: dict[str, Any]):
        from ray.util import metrics
        self.cfg = cfg
        self.name = cfg["model_name"]
        self.keys = set(cfg.get("api_keys") or [])
        if cfg.get("api_keys_env"):  # a Serve config file carries the variable's name only
            self.keys |= {k.strip() for k in os.environ.get(cfg["api_keys_env"], "").split(",")
                          if k.strip()}
        self.cache = TTLCache(cfg["cache"]["max_entries"], cfg["cache"]["ttl_s"]) \
            if cfg["cache"]["enabled"] else None
        self.inline = cfg["mode"] == "inline"  # run versions here instead of via handles
        self.arms: dict[str, Arm] = {}  # ref -> Arm
        self.handles: dict[str, Any] = {}
        self.predictors: dict[str, Any] = {}
        self.load_error: str | None = None
        self.sigs: dict[str, dict] = {}
        self.drift: dict[str, Any] = {}
        self.routing: dict[str, Any] = {"arms": [], "mode": "weighted"}
        self.shadow = {"compared": 0, "label_disagreements": 0, "abs_diff_sum": 0.0}
        self.pending: OrderedDict[str, dict] = OrderedDict()  # request_id -> rows, for feedback
        self.labelled: dict[str, dict[str, deque]] = {}  # ref -> feedback windows
        self.alerted: set[str] = set()
        self._drift_task: asyncio.Task | None = None
        tags = ("model", "version")
        self.m_requests = metrics.Counter("mlops_serve_requests", "requests answered",
                                          tag_keys=(*tags, "endpoint"))
        self.m_errors = metrics.Counter("mlops_serve_errors", "failed requests",
                                        tag_keys=(*tags, "kind"))
        self.m_latency = metrics.Histogram("mlops_serve_latency_ms", "request latency (ms)",
                                           boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
                                           tag_keys=tags)
        self.m_cache = metrics.Counter("mlops_serve_cache", "cache lookups",
                                       tag_keys=("model", "result"))
        self.m_prob = metrics.Histogram("mlops_serve_probability", "predicted probabilities",
                                        boundaries=[round(0.1 * i, 1) for i in range(1, 10)],
                                        tag_keys=tags)
        self.m_drift = metrics.Gauge("mlops_serve_drift", "per-feature drift (PSI or JS)",
                                     tag_keys=(*tags, "feature"))
        self.m_alert = metrics.Gauge("mlops_serve_drift_alert", "1 while a feature drifts",
                                     tag_keys=(*tags, "feature"))
        self.m_live_auc = metrics.Gauge("mlops_serve_live_auc", "AUC on labelled feedback",
                                        tag_keys=tags)

    # --- routing state (user_config) -------------------------------------------------------
    def reconfigure(self, routing: dict[str, Any]) -> None:
        """Load every new arm first; only when all loaded does the routing table change, so a
        version that fails to load never receives traffic (the old routing stays)."""
        from mlops_ray.serving.drift import DriftMonitor
        from mlops_ray.serving.predictor import Predictor
        loaded: dict[str, tuple] = {}
        try:
            for spec in routing["arms"]:
                ref = spec["ref"]
                if ref in self.sigs:
                    continue
                folder = _load(spec["artifact_uri"], spec["content_hash"], self.cfg["storage"])
                pred = Predictor.load(folder, ref) if self.inline else None
                handle = None if self.inline else serve.get_deployment_handle(
                    "Model", app_name=spec["app"])
                loaded[ref] = (json.loads((folder / "signature.json").read_text()),
                               DriftMonitor(json.loads((folder / "reference.json").read_text()),
                                            self.cfg["drift"]), pred, handle)
        except Exception as e:  # noqa: BLE001 - reported through routing_state()
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("routing not applied, a version failed to load: %s", self.load_error)
            return
        for ref, (sig, mon, pred, handle) in loaded.items():
            self.sigs[ref], self.drift[ref] = sig, mon
            if pred is not None:
                self.predictors[ref] = pred
            if handle is not None:
                self.handles[ref] = handle
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

    def routing_state(self) -> dict[str, Any]:
        return {**self.routing, "load_error": self.load_error}

    async def _infer(self, arm: Arm, records: list[dict]) -> dict[str, Any]:
        ref = arm.spec["ref"]
        if not self.inline:
            return await self.handles[ref].predict.remote(records)
        rate = arm.spec.get("chaos_error_rate") or 0.0
        if rate and random.random() < rate:
            raise RuntimeError(f"injected failure on {ref} (chaos_error_rate)")
        p, y = self.predictors[ref].predict_records(records)
        return {"probabilities": p.tolist(), "labels": y.tolist()}

    def stats(self) -> dict[str, Any]:
        from scipy.stats import ks_2samp
        arms = {r: a.summary() for r, a in self.arms.items()}
        stable = next((a for a in self.arms.values() if a.spec["role"] == "stable"), None)
        for ref, a in self.arms.items():  # is an arm's prediction distribution another one?
            if a is not stable and stable is not None and min(len(a.probs),
                                                              len(stable.probs)) >= 20:
                arms[ref]["shift_p"] = float(ks_2samp(a.probs, stable.probs).pvalue)
        return {"routing": self.routing, "arms": arms, "pid": os.getpid(),
                "shadow": dict(self.shadow), "cache": self.cache.stats() if self.cache else None,
                "feedback": self.live_quality()}

    def drift_table(self) -> dict[str, Any]:
        return {ref: mon.table() for ref, mon in self.drift.items() if ref in self.arms}

    # --- helpers -------------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        if not self.keys or request.url.path in HEALTH:
            return None
        got = request.headers.get("authorization", "")
        if got.startswith("Bearer ") and got[7:] in self.keys:
            return None
        self.m_errors.inc(tags={"model": self.name, "version": "-", "kind": "unauthorized"})
        return JSONResponse({"error": "missing or wrong API key (Authorization: Bearer <key>)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> Any:
        limit = int(self.cfg["limits"]["max_body_bytes"])
        if int(request.headers.get("content-length") or 0) > limit:
            raise RequestInvalid([f"body: larger than {limit} bytes"], 413)
        raw = await request.body()
        if len(raw) > limit:
            raise RequestInvalid([f"body: larger than {limit} bytes"], 413)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RequestInvalid([f"body: not JSON ({e})"]) from None

    def _choose(self, request: Request | None, records: list[dict]) -> tuple[Arm, Arm | None]:
        serving = [a for a in self.arms.values() if a.spec["role"] != "shadow"]
        if not serving:
            raise LookupError("no version is routed")
        shadow = next((a for a in self.arms.values() if a.spec["role"] == "shadow"), None)
        if len(serving) == 1:
            return serving[0], shadow
        if self.routing.get("mode") == "ab":  # sticky: the same key always gets the same arm
            header = request.headers.get("x-ab-key") if request is not None else None
            key = header or str(records[0].get(
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

    async def _predict(self, request: Request | None, records_in: Any, endpoint: str
                       ) -> tuple[Arm, dict[str, Any], str]:
        if self._drift_task is None:  # started with the first request, inside Serve's loop
            self._drift_task = asyncio.get_running_loop().create_task(self._drift_loop())
        arm, shadow = self._choose(request, records_in if isinstance(records_in, list) else [{}])
        ref = arm.spec["ref"]
        records = validate_records(records_in, self.sigs[ref],
                                   int(self.cfg["limits"]["max_rows"]),
                                   self.cfg["limits"]["unknown_categories"])
        tags = {"model": self.name, "version": str(arm.spec["version"])}
        t0 = time.perf_counter()
        key = key_of(ref, records) if self.cache else ""  # used only with a cache
        result = self.cache.get(key) if self.cache else None
        if self.cache:
            self.m_cache.inc(tags={"model": self.name, "result": "hit" if result else "miss"})
        arm.requests += 1  # answered by this arm, from its cache or its model
        if result is None:
            try:
                result = await self._infer(arm, records)
            except Exception:
                arm.errors += 1
                self.m_errors.inc(tags={**tags, "kind": "model"})
                raise
            if self.cache:
                self.cache.put(key, result)
            arm.latency_ms.append((time.perf_counter() - t0) * 1000)
            arm.rows += len(records)
            arm.probs.extend(result["probabilities"])
            self.drift[ref].add(records)
        self.m_requests.inc(tags={**tags, "endpoint": endpoint})
        self.m_latency.observe((time.perf_counter() - t0) * 1000, tags=tags)
        for p in result["probabilities"]:
            self.m_prob.observe(p, tags=tags)
        rid = uuid.uuid4().hex
        self._remember(rid, ref, records, result)
        if shadow is not None:
            asyncio.get_running_loop().create_task(self._shadow(shadow, records, result))
        return arm, result, rid

    async def _shadow(self, arm: Arm, records: list[dict], answer: dict) -> None:
        """The challenger sees a copy; its answer is compared and logged, never returned."""
        arm.requests += 1
        t0 = time.perf_counter()
        try:
            got = await self._infer(arm, records)
        except Exception as e:  # noqa: BLE001 - a failing shadow must never affect clients
            arm.errors += 1
            log.warning("shadow %s failed: %s", arm.spec["ref"], e)
            return
        arm.latency_ms.append((time.perf_counter() - t0) * 1000)
        arm.rows += len(records)
        arm.probs.extend(got["probabilities"])
        s = self.shadow
        s["compared"] += len(records)
        s["label_disagreements"] += sum(a != b for a, b in zip(got["labels"], answer["labels"]))
        s["abs_diff_sum"] += float(np.abs(np.subtract(got["probabilities"],
                                                      answer["probabilities"])).sum())

    def _remember(self, rid: str, ref: str, records: list[dict], result: dict) -> None:
        attrs = [f["name"] for f in self.sigs[ref]["inputs"] if f.get("role") == "sensitive"]
        self.pending[rid] = {"ref": ref, "p": result["probabilities"], "y_pred": result["labels"],
                             "groups": {a: [r.get(a) for r in records] for a in attrs}}
        while len(self.pending) > int(self.cfg["feedback"]["max_pending"]):
            self.pending.popitem(last=False)

    def live_quality(self) -> dict[str, Any]:
        from mlops_ray.evaluation.stats import roc_auc
        out = {}
        for ref, fb in self.labelled.items():
            y, p = np.fromiter(fb["y"], float), np.fromiter(fb["p"], float)
            d: dict[str, Any] = {"labelled_rows": len(y)}
            if len(set(y)) == 2:
                d["auc"] = float(roc_auc(y, p))
                self.m_live_auc.set(d["auc"], tags={"model": self.name,
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

    async def _drift_loop(self) -> None:
        """Every check_interval_s: drift tables off the request path (a worker thread, on a
        snapshot of the windows), gauges, and an alert (log line, metric, webhook) when a
        feature starts drifting."""
        loop = asyncio.get_running_loop()
        seen: dict[str, int] = {}
        while True:
            await asyncio.sleep(float(self.cfg["drift"]["check_interval_s"]))
            for ref, mon in list(self.drift.items()):
                if ref not in self.arms or seen.get(ref) == mon.added:
                    continue
                seen[ref] = mon.added
                try:
                    rows = await loop.run_in_executor(None, mon.table, mon.snapshot())
                    self._publish(ref, rows)
                except Exception:  # noqa: BLE001 - monitoring must never stop serving
                    log.exception("drift check of %s failed", ref)

    def _publish(self, ref: str, rows: list[dict[str, Any]]) -> None:
        version = ref.split(":")[-1]
        for row in rows:
            if "alert" not in row:
                continue
            tags = {"model": self.name, "version": version, "feature": row["feature"]}
            self.m_drift.set(row.get("psi", row.get("js", 0.0)), tags=tags)
            self.m_alert.set(1.0 if row["alert"] else 0.0, tags=tags)
            key = f"{ref}/{row['feature']}"
            if row["alert"] and key not in self.alerted:
                self.alerted.add(key)
                log.warning("DRIFT ALERT %s feature %s: %s", ref, row["feature"], row)
                url = self.cfg["drift"].get("webhook_url")
                if url:
                    asyncio.get_running_loop().run_in_executor(None, _post, url, {
                        "alert": "drift", "model": self.name, "version": ref, **row})
            elif not row["alert"]:
                self.alerted.discard(key)

    def _error(self, e: Exception) -> JSONResponse:
        if isinstance(e, RequestInvalid):
            self.m_errors.inc(tags={"model": self.name, "version": "-", "kind": "invalid"})
            return JSONResponse({"error": str(e), "problems": e.problems}, status_code=e.status)
        if isinstance(e, LookupError):
            return JSONResponse({"error": str(e)}, status_code=503)
        log.exception("prediction failed")
        return JSONResponse({"error": f"prediction failed: {type(e).__name__}: {e}"},
                            status_code=503)

    # --- endpoints -------------------------------------------------------------------------------
    @api.get("/health")
    @api.get("/v2/health/live")
    def live(self) -> dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready")
    def ready(self) -> JSONResponse:
        ok = any(a.spec["role"] != "shadow" for a in self.arms.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @api.get("/v2")
    def server_metadata(self, request: Request) -> Any:
        return self._auth(request) or {"name": "mlops_ray", "version": "2",
                                       "extensions": ["mlops_ray.predict", "mlops_ray.feedback"]}

    def _stable(self) -> Arm:
        arms = sorted(self.arms.values(), key=lambda a: a.spec["role"] != "stable")
        if not arms:
            raise LookupError("no version is routed")
        return arms[0]

    @api.get("/v2/models/{name}")
    def model_metadata(self, name: str, request: Request) -> Any:
        if (denied := self._auth(request)) or (denied := self._unknown(name)):
            return denied
        arm = self._stable()
        return oip_metadata(self.name, str(arm.spec["version"]), self.sigs[arm.spec["ref"]])

    @api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str, request: Request) -> Any:
        if (denied := self._auth(request)) or (denied := self._unknown(name)):
            return denied
        return {"name": self.name, "ready": bool(self.arms)}

    def _unknown(self, name: str) -> JSONResponse | None:
        if name != self.name:
            return JSONResponse({"error": f"unknown model {name!r}; this server has "
                                          f"{self.name!r}"}, status_code=404)
        return None

    @api.post("/v2/models/{name}/infer", openapi_extra=_openapi_body(InferRequest))
    async def infer(self, name: str, request: Request) -> Any:
        if (denied := self._auth(request)) or (denied := self._unknown(name)):
            return denied
        try:
            raw = await self._body(request)
            arm = self._stable()
            records = oip_to_records(raw, self.sigs[arm.spec["ref"]],
                                     int(self.cfg["limits"]["max_rows"]))
            arm, res, rid = await self._predict(request, records, "infer")
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON answer
            return self._error(e)
        n = len(res["labels"])
        return {"model_name": self.name, "model_version": str(arm.spec["version"]),
                "id": (raw.get("id") if isinstance(raw, dict) else None) or rid,
                "outputs": [{"name": "probability", "datatype": "FP32", "shape": [n],
                             "data": res["probabilities"]},
                            {"name": "label", "datatype": "INT64", "shape": [n],
                             "data": res["labels"]}]}

    @api.post("/predict", openapi_extra=_openapi_body(PredictRequest))
    async def predict(self, request: Request) -> Any:
        if denied := self._auth(request):
            return denied
        try:
            raw = await self._body(request)
            if not isinstance(raw, dict) or "records" not in raw:
                raise RequestInvalid(["body: must be an object with a 'records' list"])
            arm, res, rid = await self._predict(request, raw["records"], "predict")
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON answer
            return self._error(e)
        return {"model": self.name, "version": arm.spec["version"], "request_id": rid,
                "probabilities": res["probabilities"], "labels": res["labels"]}

    @api.post("/feedback", openapi_extra=_openapi_body(FeedbackRequest))
    async def feedback(self, request: Request) -> Any:
        if denied := self._auth(request):
            return denied
        try:
            raw = await self._body(request)
            if not isinstance(raw, dict):
                raise RequestInvalid(["body: must be an object"])
            rid, labels = raw.get("request_id"), raw.get("labels")
            rec = self.pending.pop(rid, None) if isinstance(rid, str) else None
            if rec is None:
                raise RequestInvalid([f"request_id={rid!r}: unknown or expired"], 404)
            if not (isinstance(labels, list) and len(labels) == len(rec["p"])
                    and all(v in (0, 1) and not isinstance(v, bool) for v in labels)):
                self.pending[str(rid)] = rec  # rid is the str rec was popped under
                raise RequestInvalid([f"labels: must be {len(rec['p'])} values of 0/1"])
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        n = int(self.cfg["feedback"]["window"])
        fb = self.labelled.setdefault(rec["ref"], {k: deque(maxlen=n) for k in ("y", "p",
                                                                                "y_pred")})
        fb["y"].extend(labels)
        fb["p"].extend(rec["p"])
        fb["y_pred"].extend(rec["y_pred"])
        for attr, vals in rec["groups"].items():
            fb.setdefault(f"g:{attr}", deque(maxlen=n)).extend(vals)
        return {"accepted": len(labels)}

    # --- gRPC: the Open Inference Protocol service through Serve's gRPC proxy -------------------
    def _grpc_denied(self, grpc_context: Any) -> bool:
        if not self.keys:
            return False
        md = dict(grpc_context.invocation_metadata()) if grpc_context else {}
        if md.get("authorization", "").removeprefix("Bearer ") in self.keys:
            return False
        import grpc
        grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        grpc_context.set_details("missing or wrong API key (metadata authorization: Bearer <key>)")
        return True

    def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - OIP name
        from mlops_ray.serving.proto import inference_pb2 as pb
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from mlops_ray.serving.proto import inference_pb2 as pb
        return pb.ServerReadyResponse(ready=any(a.spec["role"] != "shadow"
                                                for a in self.arms.values()))

    def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from mlops_ray.serving.proto import inference_pb2 as pb
        if self._grpc_denied(grpc_context):
            return pb.ModelReadyResponse()
        return pb.ModelReadyResponse(ready=request.name == self.name and bool(self.arms))

    def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from mlops_ray.serving.proto import inference_pb2 as pb
        if self._grpc_denied(grpc_context):
            return pb.ServerMetadataResponse()
        return pb.ServerMetadataResponse(name="mlops_ray", version="2",
                                         extensions=["mlops_ray.predict"])

    def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        import grpc

        from mlops_ray.serving.proto import inference_pb2 as pb
        if self._grpc_denied(grpc_context):
            return pb.ModelMetadataResponse()
        if request.name != self.name or not self.arms:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown model {request.name!r}; this server has "
                                     f"{self.name!r}")
            return pb.ModelMetadataResponse()
        arm = self._stable()
        meta = oip_metadata(self.name, str(arm.spec["version"]), self.sigs[arm.spec["ref"]])
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[T(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in meta["inputs"]],
            outputs=[T(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                     for t in meta["outputs"]])

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        """Tensors in `contents` (BYTES as UTF-8 bytes_contents); a bad request gets
        INVALID_ARGUMENT naming every offending field, like the REST 422."""
        import grpc

        from mlops_ray.serving.proto import inference_pb2 as pb
        if self._grpc_denied(grpc_context):
            return pb.ModelInferResponse()
        field = {"BYTES": "bytes_contents", "FP64": "fp64_contents", "FP32": "fp32_contents",
                 "INT64": "int64_contents", "INT32": "int_contents", "BOOL": "bool_contents"}
        try:
            if request.model_name != self.name:
                raise RequestInvalid([f"model_name={request.model_name!r}: this server has "
                                      f"{self.name!r}"], 404)
            if request.raw_input_contents:
                raise RequestInvalid(["raw_input_contents: not supported; use contents"])
            tensors = []
            for t in request.inputs:
                values = list(getattr(t.contents, field.get(t.datatype, "bytes_contents")))
                if t.datatype == "BYTES":
                    values = [v.decode("utf-8", "replace") for v in values]
                tensors.append({"name": t.name, "datatype": t.datatype,
                                "shape": list(t.shape), "data": values})
            arm = self._stable()
            records = oip_to_records({"inputs": tensors}, self.sigs[arm.spec["ref"]],
                                     int(self.cfg["limits"]["max_rows"]))
            arm, res, rid = await self._predict(None, records, "grpc")
        except RequestInvalid as e:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND if e.status == 404
                                  else grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            return pb.ModelInferResponse()
        except Exception as e:  # noqa: BLE001 - the model failed: UNAVAILABLE, never a crash
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(f"prediction failed: {type(e).__name__}: {e}")
            return pb.ModelInferResponse()
        n = len(res["labels"])
        Out = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=self.name, model_version=str(arm.spec["version"]),
            id=request.id or rid,
            outputs=[Out(name="probability", datatype="FP32", shape=[n],
                         contents=pb.InferTensorContents(fp32_contents=res["probabilities"])),
                     Out(name="label", datatype="INT64", shape=[n],
                         contents=pb.InferTensorContents(int64_contents=res["labels"]))])

    @api.get("/admin/stats")
    def admin_stats(self, request: Request) -> Any:
        return self._auth(request) or self.stats()

    @api.get("/admin/drift")
    def admin_drift(self, request: Request) -> Any:
        return self._auth(request) or self.drift_table()



def build_app(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files (`import_path: mlops_ray.serving.app:build_app`,
    as `python -m jobs.serve export` writes them for `serve deploy` or a KubeRay RayService):
    the ingress with its config; the routing (pinned registry versions) arrives as the
    deployment's user_config, so a new config with only new routing reconfigures in place."""
    return Ingress.bind(args["ingress"])  # type: ignore[attr-defined]  # a Deployment
