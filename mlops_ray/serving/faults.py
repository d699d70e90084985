"""Fault injection for rollout drills, in one place: a share of requests to a version fails
(`serve.model.chaos_error_rate`), inline in the ingress or in a version's own replicas."""
from __future__ import annotations

import random


def maybe_fail(rate: float | None, ref: str) -> None:
    if rate and random.random() < rate:
        raise RuntimeError(f"injected failure on {ref} (chaos_error_rate)")
