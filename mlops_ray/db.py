"""One database URL for the Optuna studies (and the registry): SQLite by default, any
SQLAlchemy URL (e.g. postgresql://...) for teams and clusters, where every node must reach it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlops_ray.storage import Storage


def db_url(db_cfg: dict[str, Any], storage: Storage) -> str:
    if db_cfg.get("url"):
        return db_cfg["url"]
    # a SQLite file in the local output folder (next to the runs when storage is local)
    folder = Path(storage.root) if storage.is_local else Path("outputs").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlops_ray.db'}"
