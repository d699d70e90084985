"""Node-hours per node pool while a run ran, and what they cost.

Ray's own node table (`ray.nodes()`) is sampled every `cost.sample_s` seconds for as long as the
run lasts; each sample charges the time since the previous one to every node alive at that
moment. A node's pool is its `ray.io/node-group` label (the node type of the cluster YAML or the
KubeRay worker group: Ray sets it from RAY_NODE_TYPE_NAME), else "head" / "worker"; its market is
its `ray.io/market-type` label, else "spot" when it offers the `spot` resource our cluster YAMLs
put on spot nodes, else "on_demand". All nodes of the cluster are charged: on a cluster shared by
several runs the figure is an upper bound; on a job's own cluster it is the bill.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any


def node_pool(node: dict[str, Any]) -> tuple[str, str]:
    labels, res = node.get("Labels") or {}, node.get("Resources") or {}
    pool = labels.get("ray.io/node-group") or (
        "head" if "node:__internal_head__" in res else "worker")
    market = (labels.get("ray.io/market-type") or "").lower().replace("-", "_") or (
        "spot" if res.get("spot") else "on_demand")
    return pool, market


class NodeHours:
    """`with NodeHours(10) as nh: ...; nh.report(cost_cfg)`; samples in a daemon thread."""

    def __init__(self, sample_s: float, nodes: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sample_s, self._clock = sample_s, clock
        self._nodes = nodes  # a callable returning ray.nodes()-shaped dicts (tests pass their own)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.peak: dict[tuple[str, str], int] = defaultdict(int)
        self._stop = threading.Event()
        self._last = 0.0

    def sample(self) -> None:
        now = self._clock()
        dt, self._last = now - self._last, now
        try:
            nodes = self._nodes() if self._nodes else __import__("ray").nodes()
        except Exception:  # noqa: BLE001 - accounting must never fail a run
            return
        count: dict[tuple[str, str], int] = defaultdict(int)
        for n in nodes:
            if n.get("Alive"):
                count[node_pool(n)] += 1
        for key, c in count.items():
            self.seconds[key] += dt * c
            self.peak[key] = max(self.peak[key], c)

    def _run(self) -> None:
        while not self._stop.wait(self.sample_s):
            self.sample()

    def __enter__(self) -> NodeHours:
        self._last = self._clock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="node-hours")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def report(self, cost_cfg: dict[str, Any]) -> dict[str, Any]:
        """Node-hours, cost and the saving against on-demand prices, per pool and in total."""
        pools, default = cost_cfg.get("pools") or {}, cost_cfg["default"]
        out: dict[str, Any] = {"currency": cost_cfg["currency"], "pools": {},
                               "sample_s": self.sample_s}
        total = on_demand = 0.0
        for (pool, market), secs in sorted(self.seconds.items()):
            price = pools.get(pool, default)
            hours = secs / 3600
            od = price["on_demand"] if price.get("on_demand") is not None else price["price"]
            out["pools"][f"{pool}"] = {"market": market, "node_hours": round(hours, 6),
                                       "peak_nodes": self.peak[(pool, market)],
                                       "price_per_hour": price["price"],
                                       "cost": round(hours * price["price"], 6),
                                       "on_demand_cost": round(hours * od, 6)}
            total += hours * price["price"]
            on_demand += hours * od
        out.update(node_hours=round(sum(self.seconds.values()) / 3600, 6), cost=round(total, 6),
                   on_demand_cost=round(on_demand, 6), saving=round(on_demand - total, 6),
                   saving_pct=round(100 * (on_demand - total) / on_demand, 1) if on_demand else 0.0)
        return out


def summary_line(cost: dict[str, Any] | None) -> str | None:
    if not cost:
        return None
    pools = ", ".join(f"{p} {v['node_hours']:.3f} h ({v['market']})"
                      for p, v in cost["pools"].items())
    return (f"cost       {cost['cost']:.4f} {cost['currency']} for {pools}; on demand "
            f"{cost['on_demand_cost']:.4f}, saving {cost['saving']:.4f} ({cost['saving_pct']}%)")
