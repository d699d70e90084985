"""Imported by every worker process of the warm Ray before it takes work (Ray's
`preload_python_modules`, set when the cluster starts; mlops_ray/pool.py). A worker that stays
idle without a job for a moment is one of the pool: it then imports `MLOPS_RAY_PRELOAD`
(comma-separated; conf/ray/local.yaml `preload_modules`: torch and Ray Train) on a thread, so
that the next job's actor finds them imported. A worker started for a job's actor or task gets
its job at once and imports only what that work needs (a Serve proxy never imports torch).

A job's work may reach a pool worker while that thread still imports. Two threads importing
one package's modules at once can each hold a module the other needs; Python then hands one
of them a partially initialised module, and a Train controller failed with "cannot import name
'Worker' from partially initialized module". So while `preload` runs, any other thread's import
waits for it to finish first (`held`), unless that thread is itself inside an import (holding
it back could deadlock; Python resolves that case as before)."""
from __future__ import annotations

import contextlib
import os
import threading
import time

IDLE_S = 1.0  # no job for this long: a worker of the pool
HOLD_S = 120.0  # the longest another thread's import waits for the preload
held = threading.Event()  # set once another thread's import was held back (for tests)


def _job_less() -> bool:
    import ray
    worker = ray._private.worker.global_worker
    return bool(worker.connected
                and worker.core_worker.get_current_job_id().is_nil())  # type: ignore[attr-defined]


def _inside_an_import(ident: int) -> bool:
    """Whether thread `ident` holds a module's import lock (it is executing a module)."""
    from importlib import _bootstrap
    for ref in list(_bootstrap._module_locks.values()):  # type: ignore[attr-defined]
        lock = ref()
        if lock is not None and getattr(lock, "owner", None) == ident:
            return True
    return False


def preload(names: list[str]) -> None:
    """Import `names` on this thread; meanwhile, imports of other threads wait for it."""
    import importlib
    from importlib import _bootstrap
    me, done = threading.get_ident(), threading.Event()
    original = _bootstrap._find_and_load  # type: ignore[attr-defined]

    # every import of a module not yet in sys.modules calls this (the import statement's C
    # code looks it up on importlib._bootstrap each time, as importlib.import_module does)
    def find_and_load(name: str, import_: object) -> object:
        ident = threading.get_ident()
        if ident != me and not done.is_set() and not _inside_an_import(ident):
            held.set()
            done.wait(HOLD_S)
        return original(name, import_)

    _bootstrap._find_and_load = find_and_load  # type: ignore[attr-defined]
    try:
        for name in names:
            with contextlib.suppress(Exception):  # a speed-up only, as Ray's own preload
                importlib.import_module(name)
    finally:
        done.set()
        if _bootstrap._find_and_load is find_and_load:  # type: ignore[attr-defined]
            _bootstrap._find_and_load = original  # type: ignore[attr-defined]


def _warm_up() -> None:
    until = time.monotonic() + IDLE_S
    while time.monotonic() < until:
        time.sleep(0.1)
        with contextlib.suppress(Exception):  # not connected yet: keep waiting
            if not _job_less():
                return  # a job's work arrived: leave the imports to it
    preload(list(filter(None, os.environ.get("MLOPS_RAY_PRELOAD", "").split(","))))


threading.Thread(target=_warm_up, name="mlops-preload", daemon=True).start()
