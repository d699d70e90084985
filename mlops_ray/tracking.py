"""A thin tracking facade: W&B (offline by default, files under the local output folder) or none.

W&B is imported only when used. `WANDB_MODE` in the environment wins over the config's mode, so
`WANDB_MODE=online` plus an API key turns on online tracking without a config change.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def local_dir(storage_cfg: dict[str, Any]) -> str:
    """Where W&B writes its files: under a local `storage.uri`, else ./outputs (W&B has no S3
    writer; an online run uploads from there)."""
    from mlops_ray.storage import from_cfg
    storage = from_cfg(storage_cfg)
    return os.path.join(storage.path() if storage.is_local else os.path.abspath("outputs"),
                        "wandb")


def _init(tracking: dict[str, Any], run_id: str, local_dir: str | Path, group: str | None,
          config: dict[str, Any] | None, several: bool = False) -> Any:
    """A W&B run with a stable id: a restarted or resumed run continues the same W&B run."""
    try:
        import wandb
    except ImportError:
        from mlops_ray.errors import ConfigError
        raise ConfigError("tracking=wandb needs wandb: pip install wandb (or tracking=none)") from None
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=tracking.get("project", "mlops_ray"), entity=tracking.get("entity"),
                      name=run_id, id=run_id, group=group,
                      mode=os.environ.get("WANDB_MODE", tracking.get("mode", "offline")),
                      dir=str(local_dir), config=config, resume="allow",
                      settings=wandb.Settings(console="off", x_disable_stats=True),
                      reinit="create_new" if several else None)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class Live:
    """Metrics logged while a loop runs (world rank 0 only: Ray Train V2 has no logger
    callback). W&B errors are printed, never raised: tracking must not stop training."""

    def __init__(self, tracking: dict[str, Any] | None, run_id: str, rank: int,
                 config: dict[str, Any] | None = None, several: bool = False) -> None:
        """`several`: other W&B runs are open in this process (a tuning driver's trials)."""
        self.run = None
        if not tracking or tracking.get("backend", "none") == "none" or rank != 0:
            return
        try:
            self.run = _init(tracking, run_id, tracking["dir"], tracking.get("group"), config,
                             several)
        except Exception as e:  # noqa: BLE001
            print(f"warning: W&B did not start ({type(e).__name__}: {e})")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(numeric(metrics), step=step)
            except Exception as e:  # noqa: BLE001
                print(f"warning: W&B log failed ({type(e).__name__}: {e})")

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def log_run(record: dict[str, Any], tracking: dict[str, Any], local_dir: str | Path,
            step_key: str = "epoch", history: bool = True) -> str | None:
    """Log a finished run's summary (and its history unless the loop logged it live); returns
    the W&B run directory (or None). Each history entry is one W&B step, numbered by its
    `step_key` value."""
    if tracking.get("backend", "none") == "none":
        return None
    run = _init(tracking, record["run_name"], local_dir, None, record["config"])
    for m in record.get("history", []) if history else []:
        run.log(numeric(m), step=int(m[step_key]))
    for k, v in {**record.get("best", {}), **record.get("test", {})}.items():
        if isinstance(v, (int, float)):
            run.summary[k] = v
    run.summary["dataset_version"] = record["dataset"]["version"]
    run.summary["config_hash"] = record["config_hash"]
    path = run.dir
    run.finish()
    return str(Path(path).parent)
