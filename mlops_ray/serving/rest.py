"""The REST face of the ingress: plain JSON `/predict`, the Open Inference Protocol v2 over
HTTP, `/feedback` and the admin routes, as a mixin the Serve ingress class composes (Serve
finds routes on base classes). Every handler reads the body once and every failure becomes a
JSON answer; a bad request is a 4xx naming every offending field, never a 5xx."""
# no `from __future__ import annotations`: FastAPI must see real types through Serve's ingress

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mlops_ray.errors import RequestInvalid
from mlops_ray.serving.core import IngressCore
from mlops_ray.serving.schema import oip_metadata, oip_to_records

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


class RestRoutes(IngressCore):
    @api.get("/health")
    @api.get("/v2/health/live")
    def live_check(self) -> dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready")
    def ready(self) -> JSONResponse:
        ok = self.router.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @api.get("/v2")
    def server_metadata(self, request: Request) -> Any:
        return self._auth(request) or {"name": "mlops_ray", "version": "2",
                                       "extensions": ["mlops_ray.predict", "mlops_ray.feedback"]}

    def _unknown(self, name: str) -> JSONResponse | None:
        if name != self.name:
            return JSONResponse({"error": f"unknown model {name!r}; this server has "
                                          f"{self.name!r}"}, status_code=404)
        return None

    @api.get("/v2/models/{name}")
    def model_metadata(self, name: str, request: Request) -> Any:
        if (denied := self._auth(request)) or (denied := self._unknown(name)):
            return denied
        arm = self.router.stable()
        return oip_metadata(self.name, str(arm.spec["version"]), self.router.sigs[arm.ref])

    @api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str, request: Request) -> Any:
        if (denied := self._auth(request)) or (denied := self._unknown(name)):
            return denied
        return {"name": self.name, "ready": bool(self.router.arms)}

    @api.post("/v2/models/{name}/infer", openapi_extra=_openapi_body(InferRequest))
    async def infer(self, name: str, request: Request) -> Any:
        if (denied := self._auth(request)) or (denied := self._unknown(name)):
            return denied
        try:
            raw = await self._body(request)
            arm = self.router.stable()
            records = oip_to_records(raw, self.router.sigs[arm.ref],
                                     int(self.cfg.limits.max_rows))
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
            accepted = self.live.feedback(await self._body(request))
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        return {"accepted": accepted}

    @api.get("/admin/stats")
    def admin_stats(self, request: Request) -> Any:
        return self._auth(request) or self.stats()

    @api.get("/admin/drift")
    def admin_drift(self, request: Request) -> Any:
        return self._auth(request) or self.drift_table()
