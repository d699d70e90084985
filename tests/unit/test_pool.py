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
