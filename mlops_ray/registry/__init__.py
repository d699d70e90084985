"""Model registry: immutable content-hashed versions, compare-and-swap aliases, lineage, a
hash-chained audit log and role-based access (no Ray, no Hydra)."""
from __future__ import annotations

from typing import Any

from mlops_ray.registry.policy import Policy
from mlops_ray.registry.store import ANY, Registry, Version, parse_ref

__all__ = ["ANY", "Policy", "Registry", "Version", "open_registry", "parse_ref"]


def open_registry(job: dict[str, Any]) -> Registry:
    """The registry of a validated job config: `db.url`, `storage`, `registry.policy`."""
    from mlops_ray.db import db_url
    from mlops_ray.storage import from_cfg
    storage = from_cfg(job["storage"])
    return Registry(db_url(job.get("db") or {}, storage), storage,
                    Policy.load((job.get("registry") or {}).get("policy")))
