"""The endpoint's OpenAPI document, built from the served version's signature and the limits:
every route, every status code it can answer, request schemas whose constraints are the ones
the validation applies (types, required fields, no unknown fields, category lists where they are
closed, row and string limits), so a schema-driven client or fuzzer (schemathesis) finds the
server doing what the document says. No Ray, no transport."""
from __future__ import annotations

from typing import Any

from mlops_ray.serving.schema import MAX_STRING, NUMBER_LIMIT, OIP_TYPES

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    what = {400: "malformed body (nesting too deep)", 401: "missing or wrong key",
            403: "no key is configured for this scope", 404: "unknown model or request id",
            413: "body or row count over the limits", 415: "not application/json",
            422: "the request does not match the signature (every problem named)",
            429: "rate limit", 503: "not ready, or the model failed (a request id to quote)"}
    return {str(c): _json(ERROR, what[c]) for c in codes}


def value_schema(f: dict[str, Any], unknown_categories: str) -> dict[str, Any]:
    """The JSON Schema of one input field, as validate_records checks it."""
    if f["kind"] == "numeric":
        return {"type": ["number", "null"], "minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT}
    cats = f.get("categories")
    if cats and f.get("closed"):
        return {"enum": list(cats) + ([None] if "missing" in cats else [])}
    if cats and unknown_categories == "reject":
        return {"enum": [*cats, None]}
    return {"type": ["string", "integer", "null"], "maxLength": MAX_STRING,
            "minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT}


def record_schema(signature: dict[str, Any], unknown_categories: str) -> dict[str, Any]:
    inputs = signature["inputs"]
    return {"type": "object", "additionalProperties": False,
            "properties": {f["name"]: value_schema(f, unknown_categories) for f in inputs},
            "required": [f["name"] for f in inputs if f.get("required", True)]}


def document(model: str, signature: dict[str, Any] | None, limits: Any, secured: bool
             ) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this server (`signature`: the stable version's; None before
    a version is loaded)."""
    max_rows = int(limits.max_rows)
    sig = signature or {"inputs": []}
    names = [f["name"] for f in sig["inputs"]]
    auth: list[dict[str, list[str]]] = [{"bearer": []}] if secured else []
    guarded = (401, 403) if secured else ()

    def op(summary: str, ok: dict[str, Any], codes: tuple[int, ...], body: str | None = None,
           params: bool = False) -> dict[str, Any]:
        o: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*codes)},
                             "security": auth}
        if body:
            o["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{body}"}}}}
        if params:
            o["parameters"] = [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "maxLength": 128}}]
        return o
    body_codes = (400, *guarded, 413, 415, 422, 503)
    live = _json({"type": "object", "properties": {"live": {"type": "boolean"}},
                  "required": ["live"]}, "the process is up")
    obj = {"type": "object"}
    paths = {
        "/health": {"get": {**op("liveness", live, ()), "security": []}},
        "/v2/health/live": {"get": {**op("OIP liveness", live, ()), "security": []}},
        "/v2/health/ready": {"get": {"summary": "OIP readiness", "security": [], "responses": {
            "200": _json({"$ref": "#/components/schemas/Ready"}, "a version is loaded"),
            "503": _json({"$ref": "#/components/schemas/Ready"}, "no version loaded yet")}}},
        "/v2": {"get": op("OIP server metadata", _json(obj, "name, version, extensions"),
                          guarded)},
        "/v2/models/{name}": {"get": op("OIP model metadata", _json(
            {"$ref": "#/components/schemas/ModelMetadata"}, "inputs and outputs"),
            (*guarded, 404), params=True)},
        "/v2/models/{name}/ready": {"get": op("OIP model readiness", _json(
            {"type": "object", "properties": {"name": {"type": "string"},
                                              "ready": {"type": "boolean"}}},
            "whether the model answers"), (*guarded, 404), params=True)},
        "/v2/models/{name}/infer": {"post": op(
            "OIP v2 inference", _json({"$ref": "#/components/schemas/InferResponse"},
                                      "probability and label per row"),
            (*body_codes[:-1], 404, 503), body="InferRequest", params=True)},
        "/predict": {"post": op("probabilities and labels of records", _json(
            {"$ref": "#/components/schemas/PredictResponse"}, "one answer per record"),
            body_codes, body="PredictRequest")},
        "/feedback": {"post": op("true labels of an answered request", _json(
            {"type": "object", "properties": {"accepted": {"type": "integer"}},
             "required": ["accepted"]}, "labels accepted"),
            (400, *guarded, 404, 413, 415, 422, 429), body="FeedbackRequest")},
        "/admin/stats": {"get": op("per-version statistics, routing, cache, feedback",
                                   _json(obj, "statistics"), guarded)},
        "/admin/drift": {"get": op("drift tables per version", _json(obj, "drift"), guarded)},
    }
    schemas = {
        "Error": {"type": "object", "properties": {
            "error": {"type": "string"}, "problems": {"type": "array", "items": {
                "type": "string"}}, "request_id": {"type": "string"}}, "required": ["error"]},
        "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}},
                  "required": ["ready"]},
        "Record": record_schema(sig, limits.unknown_categories),
        "PredictRequest": {"type": "object", "required": ["records"], "properties": {
            "records": {"type": "array", "minItems": 1, "maxItems": max_rows,
                        "items": {"$ref": "#/components/schemas/Record"},
                        "description": "one object per row: column -> value"}}},
        "PredictResponse": {"type": "object", "required": [
            "model", "version", "request_id", "probabilities", "labels"], "properties": {
            "model": {"type": "string"}, "version": {"type": "integer"},
            "request_id": {"type": "string"},
            "probabilities": {"type": "array", "items": {"type": "number"}},
            "labels": {"type": "array", "items": {"type": "integer"}}}},
        "Tensor": {"type": "object", "required": ["name", "shape", "datatype", "data"],
                   "properties": {
                       "name": {"enum": names} if names else {"type": "string"},
                       "shape": {"type": "array", "minItems": 1, "maxItems": 2,
                                 "items": {"type": "integer", "minimum": 0,
                                           "maximum": max_rows}},
                       "datatype": {"enum": sorted(OIP_TYPES)},
                       "data": {"type": "array", "maxItems": max_rows}}},
        "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": max(len(names), 1),
                       "items": {"$ref": "#/components/schemas/Tensor"}}},
            "description": "Open Inference Protocol v2. Besides the schema, the tensors must "
                           "agree: shape [n] or [n, 1] with n values each, the same n for "
                           "all, every required input present (422 otherwise)."},
        "InferResponse": {"type": "object", "required": ["model_name", "outputs"],
                          "properties": {"model_name": {"type": "string"},
                                         "model_version": {"type": "string"},
                                         "id": {"type": "string"},
                                         "outputs": {"type": "array", "items": obj}}},
        "ModelMetadata": {"type": "object", "required": ["name", "inputs", "outputs"],
                          "properties": {"name": {"type": "string"},
                                         "versions": {"type": "array",
                                                      "items": {"type": "string"}},
                                         "platform": {"type": "string"},
                                         "inputs": {"type": "array", "items": obj},
                                         "outputs": {"type": "array", "items": obj}}},
        "FeedbackRequest": {"type": "object", "required": ["request_id", "labels"],
                            "properties": {"request_id": {"type": "string", "maxLength": 64},
                                           "labels": {"type": "array", "minItems": 1,
                                                      "maxItems": max_rows,
                                                      "items": {"enum": [0, 1]}}}},
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": f"mlops_ray model server: {model}", "version": "2",
                 "description": "Predictions of registry versions: plain JSON and the Open "
                                "Inference Protocol v2."},
        "paths": paths, "components": {"schemas": schemas}}
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
