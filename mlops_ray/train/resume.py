"""Make a run directory resumable after the driver died at the worst moment.

Ray Train 2.60 rewrites `checkpoint_manager_snapshot.json` in place after every checkpoint (no
temporary name). A driver killed during that write leaves an empty or truncated file, and every
later run of the same name fails with `CheckpointManagerInitializationError` although the
checkpoints themselves are intact. Every checkpoint of ours carries the metrics it was reported
with (`meta.json`), so the snapshot can be rebuilt from the checkpoint folders; the damaged file is
kept beside it as `*.corrupt`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from mlops_ray.storage import Storage

SNAPSHOT = "checkpoint_manager_snapshot.json"
_CKPT = re.compile(r"^checkpoint_e\d{4}_s\d{5}$")


def _snapshot_ok(storage: Storage, run_parts: tuple[str, ...]) -> bool:
    try:
        state = json.loads(storage.read_bytes(*run_parts, SNAPSHOT))
        names = [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
    except (ValueError, KeyError, TypeError):
        return False
    return all(storage.exists(*run_parts, n, "state.pt") for n in names)


def _complete(storage: Storage, run_parts: tuple[str, ...], name: str) -> dict[str, Any] | None:
    """The reported metrics of a checkpoint folder whose files are all there and readable."""
    try:
        meta = json.loads(storage.read_bytes(*run_parts, name, "meta.json"))
        json.loads(storage.read_bytes(*run_parts, name, "preprocessor.json"))
        if not storage.read_bytes(*run_parts, name, "state.pt"):
            return None
    except Exception:  # noqa: BLE001 - any unreadable file means an incomplete upload
        return None
    return meta.get("metrics") if isinstance(meta.get("metrics"), dict) else None


def rebuilt_snapshot(storage: Storage, *run_parts: str) -> str:
    """Ray's snapshot JSON listing the complete checkpoint folders, oldest first."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )
    results = []
    for name in sorted(n for n in storage.ls(*run_parts) if _CKPT.match(n)):
        if (metrics := _complete(storage, run_parts, name)) is not None:
            results.append(_TrainingResultState(checkpoint_dir_name=name, metrics=metrics))
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=results[-1] if results else None,
        pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(results), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    return state.json()


def repair_run_dir(storage: Storage, *run_parts: str, log: Callable[[str], Any] = print) -> bool:
    """Rebuild a damaged Ray Train snapshot in place. True when something was repaired."""
    if not storage.exists(*run_parts, SNAPSHOT) or _snapshot_ok(storage, run_parts):
        return False
    damaged = storage.read_bytes(*run_parts, SNAPSHOT)
    storage.write_bytes(damaged, *run_parts, SNAPSHOT + ".corrupt")
    snapshot = rebuilt_snapshot(storage, *run_parts)
    storage.write_bytes(snapshot.encode(), *run_parts, SNAPSHOT)
    latest = json.loads(snapshot)["latest_checkpoint_result"]
    log(f"repaired {storage.uri_of(*run_parts, SNAPSHOT)} (damaged by an interrupted write; "
        f"kept as {SNAPSHOT}.corrupt): resuming from "
        f"{latest['checkpoint_dir_name'] if latest else 'the start'}")
    return True
