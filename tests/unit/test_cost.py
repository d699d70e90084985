"""Node-hours per pool and the cost estimate, from a node table shaped like ray.nodes()."""
from __future__ import annotations

import pytest

from mlops_ray.cluster.cost import NodeHours, node_pool, summary_line
from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.train import TrainJob

HEAD = {"Alive": True, "Resources": {"CPU": 0, "node:__internal_head__": 1},
        "Labels": {"ray.io/node-group": "head_on_demand"}}
GPU_SPOT = {"Alive": True, "Resources": {"CPU": 8, "GPU": 1, "spot": 1},
            "Labels": {"ray.io/node-group": "gpu_spot"}}
DEAD = {**GPU_SPOT, "Alive": False}


def test_pool_and_market_from_labels_and_resources():
    assert node_pool(HEAD) == ("head_on_demand", "on_demand")
    assert node_pool(GPU_SPOT) == ("gpu_spot", "spot")
    assert node_pool({"Resources": {"spot": 1}, "Labels": {}}) == ("worker", "spot")
    assert node_pool({"Resources": {}, "Labels": {"ray.io/market-type": "SPOT"}}) == \
        ("worker", "spot")


def test_cost_and_saving_from_the_price_table():
    cfg = validate(compose("train", ["+experiment=adult_mlp", "cost=aws_spot_gpu"]),
                   TrainJob).cost.plain()
    nh = NodeHours(10, nodes=lambda: [HEAD, GPU_SPOT, GPU_SPOT, DEAD])
    # two sampled hours: one head, two spot GPU nodes alive (the dead one is not charged)
    for key, secs in ((("head_on_demand", "on_demand"), 7200), (("gpu_spot", "spot"), 14400)):
        nh.seconds[key] = secs
    nh.peak[("gpu_spot", "spot")] = 2
    r = nh.report(cfg)
    assert r["pools"]["gpu_spot"] == {"market": "spot", "node_hours": 4.0, "peak_nodes": 2,
                                      "price_per_hour": 0.485, "cost": 1.94,
                                      "on_demand_cost": 4.848}
    assert r["cost"] == pytest.approx(2 * 0.384 + 1.94)
    assert r["saving"] == pytest.approx(4.848 - 1.94)
    assert "saving" in summary_line(r) and "gpu_spot 4.000 h (spot)" in summary_line(r)


def test_sampling_charges_alive_nodes_only():
    nodes, now = [HEAD, GPU_SPOT, DEAD], [1000.0]
    # a clock the test moves: an hour passes between the start and the sample (the sampling
    # thread's own period, an hour too, does not come round within the test)
    with NodeHours(3600, nodes=lambda: nodes, clock=lambda: now[0]) as nh:
        now[0] += 1800
        nh.sample()
        now[0] += 1800
    assert set(nh.seconds) == {("head_on_demand", "on_demand"), ("gpu_spot", "spot")}
    assert nh.seconds[("gpu_spot", "spot")] == nh.seconds[("head_on_demand", "on_demand")] == 3600
    r = nh.report({"currency": "USD", "pools": {}, "default": {"price": 0.0, "on_demand": None}})
    assert r["cost"] == 0 and r["saving_pct"] == 0.0
