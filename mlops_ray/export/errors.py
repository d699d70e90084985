"""The export's typed error (kept here, like ServeError next to serving)."""
from __future__ import annotations

from mlops_ray.errors import MlopsError


class ExportError(MlopsError):
    """A bundle cannot be built, or failed its own checks (onnx.checker, parity with the served
    model); nothing was written."""

    exit_code = 12
