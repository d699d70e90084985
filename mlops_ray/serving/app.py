"""The Serve deployments.

    HTTP :8000 ──> Ingress app "<model>" (FastAPI: /predict, OIP v2, /feedback, /admin/*)
                     │ routing table (user_config): weighted canary | sticky A/B | shadow
                     ├──> inline (default): each routed version runs inside the ingress
                     └──> handle mode: app "<model>-v3" ModelServer (registry version 3,
                          @serve.batch, its own replicas and autoscaling)

The ingress is composed of its core (core.py: validation, cache, routing, inference, live
state) and its faces: REST (rest.py) and gRPC (grpc.py). Moving traffic is a `user_config`
change of the ingress: no replica restarts, and a new version is loaded and checked first.
"""
# no `from __future__ import annotations`: FastAPI must see real types through Serve's ingress

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from mlops_ray.serving import rest
from mlops_ray.serving.faults import maybe_fail
from mlops_ray.serving.grpc import GrpcRoutes
from mlops_ray.serving.rest import api
from mlops_ray.serving.router import fetch


@serve.deployment(name="Model", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25},
                  max_surge_percent=100)
class ModelServer:
    """One registry version in its own app (handle mode): hash-checked on load, saved
    preprocessing, batched inference."""

    def __init__(self, artifact_uri: str, content_hash: str, ref: str,
                 storage_cfg: dict[str, Any], batching: dict[str, Any]):
        from mlops_ray.artifacts.predictor import Predictor
        from mlops_ray.metrics import metric
        self.p = Predictor.load(fetch(artifact_uri, content_hash, storage_cfg), ref)
        self.ref = ref
        # @serve.batch adds these setters at runtime; its typing omits them
        self.predict_batch.set_max_batch_size(  # type: ignore[attr-defined]
            int(batching["max_batch_size"]))
        self.predict_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            float(batching["batch_wait_timeout_s"]))
        self.chaos_error_rate = 0.0
        self.batch_rows = metric("mlops_serve_batch_rows")

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
        maybe_fail(self.chaos_error_rate, self.ref)
        return await self.predict_batch(records)


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25},
                  max_surge_percent=100)
@serve.ingress(api)
class Ingress(GrpcRoutes):
    """The ingress deployment: the core (core.py) with its gRPC face (grpc.py) and its REST
    routes, declared here and handled in rest.py."""

    async def __del__(self) -> None:
        # Serve calls this once the replica has drained (a scale-down, a redeploy, serve
        # shutdown): the prediction log's buffer is written before the process goes
        await self.drain()

    @api.get("/health")
    @api.get("/v2/health/live")
    def live_check(self) -> dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready")
    def ready(self) -> JSONResponse:
        return rest.ready(self)

    @api.get("/v2")
    def server_metadata(self, request: Request) -> Any:
        return rest.server_metadata(self, request)

    @api.get("/v2/models/{name}")
    def model_metadata(self, name: str, request: Request) -> Any:
        return rest.model_metadata(self, name, request)

    @api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str, request: Request) -> Any:
        return rest.model_ready(self, name, request)

    @api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Any:
        return await rest.infer(self, name, request)

    @api.post("/predict")
    async def predict(self, request: Request) -> Any:
        return await rest.predict(self, request)

    @api.post("/feedback")
    async def feedback(self, request: Request) -> Any:
        return await rest.feedback(self, request)

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> Any:
        return rest.openapi(self, request)

    @api.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> Any:
        return rest.docs(self, request)

    @api.get("/admin/stats")
    async def admin_stats(self, request: Request) -> Any:
        return await rest.admin_stats(self, request)

    @api.get("/admin/drift")
    async def admin_drift(self, request: Request) -> Any:
        return await rest.admin_drift(self, request)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files (`import_path: mlops_ray.serving.app:build_app`,
    as `python -m jobs.serve action=export` writes them for `serve deploy` or a KubeRay
    RayService): the ingress with its config; the routing (pinned registry versions) arrives as
    the deployment's user_config, so a new config with only new routing reconfigures in place."""
    return Ingress.bind(args["ingress"])  # type: ignore[attr-defined]  # a Deployment
