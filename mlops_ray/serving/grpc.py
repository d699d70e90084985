"""The gRPC face of the ingress: the Open Inference Protocol v2 service
(`inference.GRPCInferenceService`) through Serve's gRPC proxy, as a mixin of the ingress
(clients send the metadata ("application", "<app>") and API keys as `authorization: Bearer`).
A bad request gets INVALID_ARGUMENT naming every offending field, like the REST 422."""
from __future__ import annotations

from typing import Any

from mlops_ray.errors import RequestInvalid
from mlops_ray.serving.auth import key_ok
from mlops_ray.serving.core import IngressCore
from mlops_ray.serving.schema import oip_metadata, oip_to_records


class GrpcRoutes(IngressCore):
    def _grpc_denied(self, grpc_context: Any) -> bool:
        if self.open:
            return False
        md = dict(grpc_context.invocation_metadata()) if grpc_context else {}
        key = md.get("authorization", "").removeprefix("Bearer ")  # prefix optional here
        if key_ok(f"Bearer {key}", self.keys):
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
        return pb.ServerReadyResponse(ready=self.router.ready())

    def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from mlops_ray.serving.proto import inference_pb2 as pb
        if self._grpc_denied(grpc_context):
            return pb.ModelReadyResponse()
        return pb.ModelReadyResponse(ready=request.name == self.name and bool(self.router.arms))

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
        if request.name != self.name or not self.router.arms:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown model {request.name!r}; this server has "
                                     f"{self.name!r}")
            return pb.ModelMetadataResponse()
        arm = self.router.stable()
        meta = oip_metadata(self.name, str(arm.spec["version"]), self.router.sigs[arm.ref])
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
            arm = self.router.stable()
            records = oip_to_records({"inputs": tensors}, self.router.sigs[arm.ref],
                                     int(self.cfg.limits.max_rows))
            arm, res, rid = await self._predict(None, records, "grpc")
        except RequestInvalid as e:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND if e.status == 404
                                  else grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            return pb.ModelInferResponse()
        except Exception:  # the model failed: UNAVAILABLE, never a crash; details in the log
            import logging
            import uuid
            rid = uuid.uuid4().hex
            logging.getLogger("ray.serve").exception("gRPC request %s: prediction failed", rid)
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(f"prediction failed (request id {rid})")
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
