"""Imported by every worker process of the warm Ray before it takes work (Ray's
`preload_python_modules`, set when the cluster starts; mlops_ray/pool.py). A worker that stays
idle without a job for a moment is one of the pool: it then imports `MLOPS_RAY_PRELOAD`
(comma-separated; conf/ray/local.yaml `preload_modules`: torch and Ray Train) on a thread, so
that the next job's actor finds them imported. A worker started for a job's actor or task gets
its job at once and imports only what that work needs (a Serve proxy never imports torch)."""
from __future__ import annotations

import contextlib
import os
import threading
import time

IDLE_S = 1.0  # no job for this long: a worker of the pool


def _job_less() -> bool:
    import ray
    worker = ray._private.worker.global_worker
    return bool(worker.connected
                and worker.core_worker.get_current_job_id().is_nil())  # type: ignore[attr-defined]


def _warm_up() -> None:
    import importlib
    until = time.monotonic() + IDLE_S
    while time.monotonic() < until:
        time.sleep(0.1)
        with contextlib.suppress(Exception):  # not connected yet: keep waiting
            if not _job_less():
                return  # a job's work arrived: leave the imports to it
    for name in filter(None, os.environ.get("MLOPS_RAY_PRELOAD", "").split(",")):
        with contextlib.suppress(Exception):  # a speed-up only, as Ray's own preload
            importlib.import_module(name)


threading.Thread(target=_warm_up, name="mlops-preload", daemon=True).start()
