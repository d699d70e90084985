"""Model registry: immutable content-hashed versions, compare-and-swap aliases, lineage, a
hash-chained audit log and role-based access (no Ray, no Hydra)."""
from __future__ import annotations

from typing import Any

from mlops_ray.registry.policy import Policy
from mlops_ray.registry.store import ANY, Registry, Version, parse_ref

__all__ = ["ANY", "Policy", "Registry", "Version", "open_registry", "parse_ref"]


def open_registry(job: Any, actor: str | None = None) -> Registry:
    """The registry a validated job names: its `storage`, `db.url` and `registry.policy`
    (`actor`: act as this identity, one the caller's own checks established, e.g. a rollout
    running in the cluster on behalf of the approver who started it)."""
    from mlops_ray.db import db_url
    from mlops_ray.storage import from_cfg
    storage = from_cfg(job.storage.plain())
    return Registry(db_url(job.db.plain(), storage), storage, Policy.load(job.registry.policy),
                    actor=actor)
