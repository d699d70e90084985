"""The warm Ray's pool keeper (mlops_ray/pool.py) decides without Ray when to refill."""
from __future__ import annotations

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
    assert got == train_env_vars()  # this process's own environment gives the same
