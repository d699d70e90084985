"""A finished run as the stages after training read it: its record (run.json) found from a run
folder, its run.json or a tuning folder, and its best checkpoint as raw rows -> probabilities."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.errors import RunNotFound
from mlops_ray.storage import Storage, resolve


def resolve_run(uri: str, storage_cfg: dict[str, Any]) -> tuple[dict[str, Any], Storage]:
    """A run record and its folder, from a run folder, a run.json, or a tuning folder."""
    uri = uri.removesuffix("/run.json").removesuffix("/tune.json").rstrip("/")
    st = resolve(uri, storage_cfg.get("endpoint_url"), storage_cfg.get("region"))
    if st.exists("tune.json"):  # a tuning run: evaluate its best trial's run record
        best = st.read_json("tune.json").get("best") or {}
        if not best.get("run_uri"):
            raise RunNotFound(f"run={uri}: the tuning run has no finished best trial")
        return resolve_run(best["run_uri"], storage_cfg)
    if not st.exists("run.json"):
        raise RunNotFound(f"run={uri}: no run.json there (give a run folder, its run.json, or a "
                          "tuning folder)")
    rec = st.read_json("run.json")
    if rec.get("status") != "finished":
        raise RunNotFound(f"run={uri}: status is '{rec.get('status')}', not finished")
    return rec, st


def verified_checkpoint(rec: dict[str, Any], which: str, storage_cfg: dict[str, Any],
                        tmp: str) -> Path:
    """The run's `which` ("best" | "latest") checkpoint as a local folder, after checking its
    files against the digest run.json recorded (UnsafeArtifact when they differ)."""
    ckpts = rec["checkpoints"]
    d = checkpoint_dir(ckpts[which], storage_cfg, tmp)
    ckpt_io.verify(d, (ckpts.get("digest") or {}).get(which),
                   f"run {rec.get('run_name')} checkpoint {which}")
    return d


def checkpoint_dir(uri: str, storage_cfg: dict[str, Any], tmp: str) -> Path:
    """A local folder with the checkpoint at `uri` (downloaded into `tmp` when remote)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    import pyarrow.fs as pafs
    src = resolve(uri, storage_cfg.get("endpoint_url"), storage_cfg.get("region"))
    pafs.copy_files(src.root, tmp, source_filesystem=src.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return Path(tmp)


class CheckpointProba:
    """Raw rows -> probabilities of a loaded checkpoint; picklable, so a fitted
    ThresholdOptimizer around it can be saved with the report."""

    def __init__(self, model: Any, pre: Any):
        self.model, self.pre = model, pre

    def __call__(self, rows: pd.DataFrame) -> np.ndarray:
        return ckpt_io.predict_proba(self.model, self.pre.transform(rows))


def load_run_model(rec: dict[str, Any], storage_cfg: dict[str, Any]) -> CheckpointProba:
    """A run's best checkpoint as raw rows -> probabilities (its own preprocessing)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, pre, _ = ckpt_io.load_model(verified_checkpoint(rec, "best", storage_cfg, tmp))
    return CheckpointProba(model, pre)
