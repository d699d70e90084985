"""Small helpers shared by the core and the Ray layers (no Ray, no Hydra)."""
from __future__ import annotations

import hashlib
import importlib
import json
from typing import Any


def locate(target: str) -> Any:
    """Import `pkg.mod.Name` (the `_target_` convention) without Hydra, e.g. inside Ray workers."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        from mlops_ray.errors import ConfigError
        raise ConfigError(f"_target_: cannot import '{target}' ({e})") from None


def build(spec: dict[str, Any], **extra: Any) -> Any:
    """Instantiate a `{_target_: ..., _partial_: bool, **kwargs}` spec with extra kwargs."""
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
    fn = locate(spec["_target_"])
    if spec.get("_partial_"):
        import functools
        return functools.partial(fn, **kwargs, **extra)
    return fn(**kwargs, **extra)


def stable_hash(obj: Any, n: int = 12) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
