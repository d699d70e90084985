"""A run directory whose Ray Train snapshot was cut short by a killed driver still resumes."""
from __future__ import annotations

import json

import torch

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.storage import from_cfg
from mlops_ray.train.resume import SNAPSHOT, repair_run_dir


def _checkpoint(run_dir, epoch: int) -> None:
    d = run_dir / f"checkpoint_e{epoch:04d}_s00000"
    d.mkdir(parents=True)
    ckpt_io.save(d, {"model": {"w": torch.ones(2)}, "epoch": epoch}, {
        "epoch": epoch, "metrics": {"epoch": epoch - 1, "val/auc": 0.5 + epoch / 100}}, {})


def test_empty_snapshot_is_rebuilt_from_complete_checkpoints(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    for e in (1, 2, 3):
        _checkpoint(run_dir, e)
    # the newest folder's upload was cut short: its state.pt is missing
    (run_dir / "checkpoint_e0003_s00000" / "state.pt").unlink()
    (run_dir / SNAPSHOT).write_text("")  # the driver died while Ray rewrote it
    logged = []
    storage = from_cfg({"uri": str(tmp_path)})
    assert repair_run_dir(storage, "runs", "r", log=logged.append)
    state = json.loads((run_dir / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in state["checkpoint_results"]] == [
        "checkpoint_e0001_s00000", "checkpoint_e0002_s00000"]
    assert state["latest_checkpoint_result"]["metrics"]["val/auc"] == 0.52
    assert (run_dir / (SNAPSHOT + ".corrupt")).read_text() == ""
    assert "checkpoint_e0002_s00000" in logged[0]
    # Ray's own loader accepts it
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
    )
    assert _CheckpointManagerState.parse_obj(state).current_report_index == 2
    # a sound snapshot is left alone
    assert not repair_run_dir(storage, "runs", "r", log=logged.append)
