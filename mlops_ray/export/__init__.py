"""Offline / edge export of registry versions: a self-contained bundle (ONNX with the
preprocessing folded in, or TorchScript) that runs with its runtime alone, verified against the
served model before it is written. No Ray, no Hydra."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlops_ray.config.batch import ExportJob
from mlops_ray.errors import ExportError
from mlops_ray.export.bundle import (
    FORMATS,
    MODEL_FILE,
    TOLERANCE,
    Bundle,
    build_bundle,
    check_format,
    default_name,
    lineage_of,
    verify_bundle,
    write_bundle,
)

__all__ = ["FORMATS", "MODEL_FILE", "TOLERANCE", "Bundle", "ExportError", "build_bundle",
           "check_format", "default_name", "export", "lineage_of", "verify_bundle",
           "write_bundle"]


def export(job: ExportJob, log: Callable[[str], Any] = print) -> str:
    """jobs.export: fetch the version, build and verify the bundle, write it, audit it.
    Returns the bundle's URI."""
    from mlops_ray.registry import open_registry
    from mlops_ray.storage import from_cfg, resolve
    reg = open_registry(job)
    version, folder = reg.fetch(job.ref)
    log(f"exporting  {version.ref} ({job.ref}, content {version.content_hash[:16]}) "
        f"as {job.format}")
    bundle = build_bundle(folder, lineage_of(version), job.format)
    st = job.storage
    where = job.out or from_cfg(st.plain()).uri_of(
        "exports", default_name(version.model, version.version, job.format))
    dest = resolve(where, st.endpoint_url, st.region)
    uri = write_bundle(bundle, dest)
    reg.record("export", version.model, version.version, need="read", details={
        "format": job.format, "uri": uri, "content_hash": version.content_hash})
    p = bundle.manifest["parity"]
    log(f"parity     max |probability - served| {p['max_abs_diff']:.2e} on {p['rows']} "
        f"rows (allowed {p['tolerance']:g})\nbundle     {uri}\n"
        f"try it     cd {dest.path() if dest.is_local else '<a copy of it>'} && "
        "python example.py")
    return uri
