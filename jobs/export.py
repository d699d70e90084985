"""Export a registry version as a self-contained offline / edge bundle.

    python -m jobs.export model=adult_mlp@production format=onnx   # -> outputs/exports/adult_mlp-v<N>-onnx/
    python -m jobs.export model=adult_mlp:3 format=torchscript     # -> outputs/exports/adult_mlp-v3-torchscript/
    python -m jobs.export model=adult_mlp out=/tmp/adult_edge      # bare name: @production; format=onnx
    python -m jobs.export model=adult_mlp@production storage.uri=s3://bucket/prefix db.url=postgresql://...
    cd outputs/exports/adult_mlp-v<N>-onnx && python example.py  # needs only onnxruntime + numpy

The bundle (model file, signature, model card, preprocessor, example.py + example rows, README,
MANIFEST.json with SHA-256s and lineage) is checked against the served model before it is
written: onnx.checker, and probabilities within 1e-5 of the Predictor the Serve replicas run.
No Ray. Exit codes: 0 ok, 2 bad config, 6 unknown model/version/alias, 7 denied, 12 the bundle
failed its checks (nothing written).
"""
from __future__ import annotations

import sys

from mlops_ray.config import compose_with_model, user_errors, validate
from mlops_ray.config.schema import ExportJobCfg


def job_from_args(args: list[str]) -> dict:
    """conf/export.yaml with `model=REF`, a registry ref."""
    cfg = compose_with_model("export", args, {
        "model": "the registry version to export, e.g. model=adult_mlp@production or "
                 "model=adult_mlp:3"})
    return validate(cfg, ExportJobCfg).model_dump(by_alias=True)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    bad = [a for a in args if "=" not in a]
    if bad:
        print(f"error: unknown argument(s) {bad}; settings are key=value (model=adult_mlp@"
              "production format=onnx|torchscript out=DIR)", file=sys.stderr)
        sys.exit(2)
    with user_errors():
        job = job_from_args(args)
        from mlops_ray.export import export
        export(job, log=lambda m: print(m, flush=True))

if __name__ == "__main__":
    main()
