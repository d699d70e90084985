"""The REST face of the ingress: plain JSON `/predict`, the Open Inference Protocol v2 over
HTTP, `/feedback` and the admin routes: the FastAPI app, its documented request bodies, and the
handlers. Every handler reads the body once and every failure becomes a JSON answer; a bad
request is a 4xx naming every offending field, never a 5xx."""
# no `from __future__ import annotations`: FastAPI must see real types through Serve's ingress

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlops_ray.errors import RequestInvalid
from mlops_ray.serving.core import IngressCore
from mlops_ray.serving.schema import oip_metadata, oip_to_records

# /docs and /openapi.json are routes of the ingress (app.py), behind the same keys as predictions
api = FastAPI(title="mlops_ray model server", docs_url=None, redoc_url=None, openapi_url=None,
              description="Predictions of registry versions: plain JSON and the Open Inference "
                          "Protocol v2. Non-health endpoints need `Authorization: Bearer <key>` "
                          "when keys are configured: predictions the API key, /feedback the "
                          "feedback key, /admin/* the admin key.")


# The handlers of the REST routes, over the ingress core. The routes themselves are declared on
# the ingress class (app.py): Serve turns class methods into FastAPI views, and methods of an
# importable base class would reach the replicas without that conversion.

def ready(ing: IngressCore) -> JSONResponse:
    ok = ing.router.ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def server_metadata(ing: IngressCore, request: Request) -> Any:
    return ing._auth(request) or {"name": "mlops_ray", "version": "2",
                                  "extensions": ["mlops_ray.predict", "mlops_ray.feedback"]}


def _unknown(ing: IngressCore, name: str) -> JSONResponse | None:
    if name != ing.name:
        return JSONResponse({"error": f"unknown model {name!r}; this server has "
                                      f"{ing.name!r}"}, status_code=404)
    return None


def model_metadata(ing: IngressCore, name: str, request: Request) -> Any:
    if (denied := ing._auth(request)) or (denied := _unknown(ing, name)):
        return denied
    arm = ing.router.stable()
    return oip_metadata(ing.name, str(arm.spec["version"]), ing.router.sigs[arm.ref])


def model_ready(ing: IngressCore, name: str, request: Request) -> Any:
    if (denied := ing._auth(request)) or (denied := _unknown(ing, name)):
        return denied
    return {"name": ing.name, "ready": bool(ing.router.arms)}


async def infer(ing: IngressCore, name: str, request: Request) -> Any:
    if (denied := ing._auth(request)) or (denied := _unknown(ing, name)):
        return denied
    try:
        raw = await ing._body(request)
        if isinstance(raw, dict) and "id" in raw and not isinstance(raw["id"], str):
            raise RequestInvalid(["id: must be a string"])
        arm = ing.router.stable()
        records = oip_to_records(raw, ing.router.sigs[arm.ref], int(ing.cfg.limits.max_rows))
        arm, res, rid = await ing._predict(request, records, "infer")
    except Exception as e:  # noqa: BLE001 - every failure becomes a JSON answer
        return ing._error(e)
    n = len(res["labels"])
    return {"model_name": ing.name, "model_version": str(arm.spec["version"]),
            "id": (raw.get("id") if isinstance(raw, dict) else None) or rid,
            "outputs": [{"name": "probability", "datatype": "FP32", "shape": [n],
                         "data": res["probabilities"]},
                        {"name": "label", "datatype": "INT64", "shape": [n],
                         "data": res["labels"]}]}


async def predict(ing: IngressCore, request: Request) -> Any:
    if denied := ing._auth(request):
        return denied
    try:
        raw = await ing._body(request)
        if not isinstance(raw, dict) or "records" not in raw:
            raise RequestInvalid(["body: must be an object with a 'records' list"])
        arm, res, rid = await ing._predict(request, raw["records"], "predict")
    except Exception as e:  # noqa: BLE001 - every failure becomes a JSON answer
        return ing._error(e)
    return {"model": ing.name, "version": arm.spec["version"], "request_id": rid,
            "probabilities": res["probabilities"], "labels": res["labels"]}


async def feedback(ing: IngressCore, request: Request) -> Any:
    if (denied := ing._auth(request, "feedback")) or (denied := ing._rate_limited(request)):
        return denied
    try:
        accepted = await ing.feedback_labels(await ing._body(request))
    except Exception as e:  # noqa: BLE001
        return ing._error(e)
    return {"accepted": accepted}


async def admin_stats(ing: IngressCore, request: Request) -> Any:
    return ing._auth(request, "admin") or await ing.stats()


async def admin_drift(ing: IngressCore, request: Request) -> Any:
    return ing._auth(request, "admin") or await ing.drift_table()


def openapi(ing: IngressCore, request: Request) -> Any:
    """The document of this server: its routes, status codes and the served version's input
    schema (openapi.py)."""
    if denied := ing._auth(request):
        return denied
    from mlops_ray.serving.openapi import document
    sig = ing.router.sigs.get(ing.router.stable().ref) if ing.router.ready() else None
    return JSONResponse(document(ing.name, sig, ing.cfg.limits, secured=not ing.open))


def docs(ing: IngressCore, request: Request) -> Any:
    if denied := ing._auth(request):
        return denied
    from fastapi.openapi.docs import get_swagger_ui_html
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=request.app.title)
