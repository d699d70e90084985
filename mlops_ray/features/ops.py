"""What `jobs.features` does for each action."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from mlops_ray.config.train import FeaturesJob
from mlops_ray.data.featurestore import FeatureRepo
from mlops_ray.errors import ConfigError


def run(job: FeaturesJob) -> dict[str, Any]:
    if job.dataset.feast is None:  # FeaturesJob's validator refuses it; for the type checker
        raise ConfigError("dataset.feast: this experiment's dataset has no feature store")
    repo = FeatureRepo(job.dataset.feast, job.storage.uri)
    out: dict[str, Any]
    if job.action == "apply":
        out = {"applied": repo.apply(), "store": str(repo.root)}
    elif job.action == "materialize":
        out = repo.materialize(datetime.fromisoformat(job.end) if job.end else None)
    elif job.action == "list":
        repo.ensure_applied()
        out = {"store": str(repo.root), "views": repo.describe()}
    else:
        from mlops_ray.features.actor import start_consumer, stop_consumer
        out = start_consumer(job) if job.action == "consume" else stop_consumer(job)
    print(json.dumps(out, indent=2, default=str))
    return out
