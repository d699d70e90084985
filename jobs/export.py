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

from mlops_ray.config import compose, user_errors, validate
from mlops_ray.config.schema import ExportJobCfg
from mlops_ray.errors import ConfigError


def job_from_args(args: list[str]) -> dict:
    """Compose conf/export.yaml. `model` is also a config group (the network) that Hydra would
    try to select, so `model=REF` (a registry ref here) is set after composition."""
    refs = [a.split("=", 1)[1] for a in args if a.startswith("model=")]
    cfg = compose("export", [a for a in args if not a.startswith("model=")])
    if refs:
        cfg["model"] = refs[-1]
    if cfg.get("model") is None:
        raise ConfigError("model: required (the registry version to export, e.g. "
                          "model=adult_mlp@production or model=adult_mlp:3)")
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
        from mlops_ray.export import build_bundle, default_name, lineage_of, write_bundle
        from mlops_ray.registry import open_registry
        from mlops_ray.storage import from_cfg, resolve
        reg = open_registry(job)
        version, folder = reg.fetch(job["model"])
        print(f"exporting  {version.ref} ({job['model']}, content {version.content_hash[:16]}) "
              f"as {job['format']}", flush=True)
        bundle = build_bundle(folder, lineage_of(version), job["format"])
        st = job["storage"]
        where = job["out"] or from_cfg(st).uri_of(
            "exports", default_name(version.model, version.version, job["format"]))
        dest = resolve(where, st.get("endpoint_url"), st.get("region"))
        uri = write_bundle(bundle, dest)
        reg.record("export", version.model, version.version, need="read", details={
            "format": job["format"], "uri": uri, "content_hash": version.content_hash})
        p = bundle.manifest["parity"]
        print(f"parity     max |probability - served| {p['max_abs_diff']:.2e} on {p['rows']} "
              f"rows (allowed {p['tolerance']:g})\nbundle     {uri}\n"
              f"try it     cd {dest.path() if dest.is_local else '<a copy of it>'} && "
              "python example.py", flush=True)


if __name__ == "__main__":
    main()
