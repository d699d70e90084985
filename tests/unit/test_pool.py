"""The warm Ray's pool keeper (mlops_ray/pool.py) decides without Ray when to refill."""
from __future__ import annotations

import os

from mlops_ray.pool import Keeper


def test_an_idle_warm_ray_stops_refilling_its_pool_after_the_keep_alive():
    """Refilled within keep_alive_s of the last job only: a warm Ray nobody uses lets its idle
    workers end with their keep-alive instead of starting 8 new ones every keep_alive_s."""
    keeper = Keeper.__new__(Keeper)  # its state alone: no thread, no Ray
    keeper.keep_alive_s, keeper.last_job = 900, 5_000.0
    assert keeper.refilling(5_000.0 + 899)
    assert not keeper.refilling(5_000.0 + 900)
    keeper.last_job = 6_000.0  # a job ran again
    assert keeper.refilling(5_000.0 + 900)


def test_the_keeper_reads_the_train_runtime_env_as_ray_train_does(monkeypatch):
    """A job tells the keeper its environment's RAY_/TORCHFT_/NCCL_ part (without importing
    Ray Train); read from it, the Train runtime_env is the one Ray Train gives the controller of
    a fit() from this environment, so the pool's train workers match that job's actors."""
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as warn
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        ENV_VARS_TO_PROPAGATE,
        get_env_vars_to_propagate,
    )

    from mlops_ray.pool import PROPAGATED_PREFIXES, driver_env, train_env_vars
    assert all(k.startswith(PROPAGATED_PREFIXES) and "TOKEN" not in k
               for k in ENV_VARS_TO_PROPAGATE)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    told = driver_env()
    assert "RAY_AUTH_TOKEN" not in told and "AWS_SECRET_ACCESS_KEY" not in told
    got = train_env_vars(told)
    assert got is not None
    want = get_env_vars_to_propagate()  # and what the trainer adds to it, as it does
    want.setdefault(warn, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    assert got == want
    assert want["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    assert got == train_env_vars(os.environ)  # this process's own environment gives the same


GATE = '''
import threading, time
from importlib import _bootstrap
in_a = threading.Event()


def other_thread_came():
    """Until the test's thread waits on pkg.a (without the fix) or was held back (with it)."""
    from mlops_ray import _preload
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _preload.held.is_set():
        waits = list(_bootstrap._blocking_on.values())
        if any(getattr(w, "name", None) == "pkg.a" for w in waits):
            return
        time.sleep(0.01)
'''
PKG = {"__init__.py": "from pkg import a\n",
       # a circular import, as in Ray Train, that works on one thread
       "a.py": "import gate\nx = 1\ngate.in_a.set()\ngate.other_thread_came()\n"
               "from pkg.b import f\n",
       "b.py": "from pkg.a import x\n\n\ndef f():\n    return x\n"}


def test_a_jobs_import_during_the_pools_preload_waits_for_it(tmp_path, monkeypatch):
    """A job's work can reach a pool worker while its preload thread still imports Ray Train.
    Without care, the two threads each hold a module the other needs and one gets a partially
    initialised module (a Train controller failed so). The preload holds the other thread's
    import back until it is done: both imports succeed."""
    import importlib
    import sys
    import threading

    from mlops_ray import _preload
    (tmp_path / "gate.py").write_text(GATE)
    (tmp_path / "pkg").mkdir()
    for name, text in PKG.items():
        (tmp_path / "pkg" / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in ("gate", "pkg", "pkg.a", "pkg.b"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    _preload.held.clear()
    import gate  # type: ignore[import-not-found]
    worker = threading.Thread(target=_preload.preload, args=(["pkg"],))
    worker.start()
    assert gate.in_a.wait(60)  # the preload is inside pkg.a
    b = importlib.import_module("pkg.b")  # the job's import, meanwhile
    worker.join(60)
    assert _preload.held.is_set()
    assert b.f() == 1
    assert sys.modules["pkg.a"].f is b.f  # the preload's import completed too
    from importlib import _bootstrap
    assert _bootstrap._find_and_load.__name__ == "_find_and_load"  # put back
