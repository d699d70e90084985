"""Offline / edge export of registry versions: a self-contained bundle (ONNX with the
preprocessing folded in, or TorchScript) that runs with its runtime alone, verified against the
served model before it is written. No Ray, no Hydra."""
from __future__ import annotations

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
from mlops_ray.export.errors import ExportError

__all__ = ["FORMATS", "MODEL_FILE", "TOLERANCE", "Bundle", "ExportError", "build_bundle",
           "check_format", "default_name", "lineage_of", "verify_bundle", "write_bundle"]
