"""A thin tracking facade: W&B (offline by default, files under the local output folder) or none.

W&B is imported only when used. `WANDB_MODE` in the environment wins over the config's mode, so
`WANDB_MODE=online` plus an API key turns on online tracking without a config change.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def log_run(record: dict[str, Any], tracking: dict[str, Any], local_dir: str | Path,
            group: str | None = None, step_key: str = "epoch") -> str | None:
    """Log a finished run's history and summary; returns the W&B run directory (or None).
    Each history entry is one W&B step, numbered by its `step_key` value."""
    if tracking.get("backend", "none") == "none":
        return None
    try:
        import wandb
    except ImportError:
        from mlops_ray.errors import ConfigError
        raise ConfigError("tracking=wandb needs wandb: pip install wandb (or tracking=none)") from None
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=tracking.get("project", "mlops_ray"), entity=tracking.get("entity"),
                     name=record["run_name"], id=record["run_name"], group=group,
                     mode=os.environ.get("WANDB_MODE", tracking.get("mode", "offline")),
                     dir=str(local_dir), config=record["config"], resume="allow",
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    for m in record.get("history", []):
        run.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=int(m[step_key]))
    for k, v in {**record.get("best", {}), **record.get("test", {})}.items():
        if isinstance(v, (int, float)):
            run.summary[k] = v
    run.summary["dataset_version"] = record["dataset"]["version"]
    run.summary["config_hash"] = record["config_hash"]
    path = run.dir
    run.finish()
    return str(Path(path).parent)
