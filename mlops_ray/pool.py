"""Idle workers of no job on the warm Ray, ready for the next job's actors and tasks.

Ray binds a worker process to the job it first runs something for and ends it with that job,
so every job pays for new processes: starting Python, importing Ray, torch and Ray Train (on 2
cores, the larger part of a short `jobs.train`). A worker that Ray's raylet starts through its
PrestartWorkers call *without* a job serves whichever job next asks for a worker with the same
runtime_env, at once; such a worker imports torch and Ray Train while it waits
(mlops_ray/_preload.py; conf/ray/local.yaml `preload_modules`).

A detached actor of the warm Ray, the keeper, refills the pool while no job runs (so that the
refill never takes CPU from a job) to the sizes the last job attached with, per kind:

    tasks          the job's own runtime_env (empty on the warm Ray): CV folds, Ray Data, Serve
    train          the runtime_env Ray Train gives its controller (its own variables from the
                   driver's environment), which the controller's helper actors inherit
    train_workers  the same variables as the training workers get them: Ray's core merges
                   them into the controller's and writes them out compactly, a runtime_env of
                   another hash for the raylet

Which kind an idle worker is cannot be read from the worker itself (the two train kinds have
one environment): the keeper remembers the pids each of its rounds started.

Everything here is a speed-up only: any failure leaves the job as it was (new processes).
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

WORKER = 0  # common_pb2.WorkerType.WORKER: a task or actor worker, not a driver


PROPAGATED_PREFIXES = ("RAY_", "TORCHFT_", "NCCL_")


def driver_env() -> dict[str, str]:
    """The part of this process's environment that Ray Train may propagate (names of
    `ENV_VARS_TO_PROPAGATE` all start so; tests/unit/test_pool.py checks it), without importing
    Ray Train: a job that never trains (jobs.predict, jobs.serve) would pay ~0.2 s for it."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(PROPAGATED_PREFIXES) and "TOKEN" not in k}


def train_env_vars(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The env_vars of the runtime_env that Ray Train gives its controller when a driver with
    the environment `environ` calls fit(), computed the way Ray Train
    computes them (DataParallelTrainer._initialize_and_run_controller,
    get_env_vars_to_propagate). The controller's own actors inherit it and the workers'
    runtime_env holds the same variables, propagated from the controller's environment."""
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as warn
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as default,
        )
        from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
    except ImportError:  # another Ray version: no pool of this kind
        return None
    env = {k: environ[k] for k in ENV_VARS_TO_PROPAGATE if k in environ}
    env.setdefault(warn, default)
    return env


def _stub() -> Any:
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import node_manager_pb2_grpc
    node = ray.get_runtime_context().get_node_id()
    raylet = next(n for n in ray.nodes() if n["NodeID"] == node)
    channel = init_grpc_channel(f"{raylet['NodeManagerAddress']}:{raylet['NodeManagerPort']}")
    return node_manager_pb2_grpc.NodeManagerServiceStub(channel)


def idle_of_no_job(stub: Any) -> set[int]:
    """Pids of this node's workers that no job holds (what the pool is made of)."""
    from ray.core.generated import node_manager_pb2
    stats = stub.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(),  # type: ignore[attr-defined]
                              timeout=10)
    return {w.pid for w in stats.core_workers_stats
            if w.worker_type == WORKER and w.job_id == b"\xff" * len(w.job_id)}


def _runtime_env_info(kind: str, env_vars: dict[str, str]) -> Any:
    """What the raylet gets for an actor of this kind: its hash is that of the serialized
    runtime_env, so the text must be the very one Ray writes."""
    from ray._private.utils import get_runtime_env_info, parse_runtime_env_for_task_or_actor
    info = get_runtime_env_info(parse_runtime_env_for_task_or_actor({"env_vars": env_vars}),
                                is_job_runtime_env=False, serialize=False)
    if kind == "train_workers":  # as Ray's core (nlohmann::json) writes a merged runtime_env
        info.serialized_runtime_env = json.dumps({"env_vars": env_vars}, sort_keys=True,
                                                 separators=(",", ":"))
    return info


QUIET_S = 3.0  # no job for this long before the keeper refills


class Keeper:
    """The pool's keeper (one detached actor per warm Ray, `keeper()`)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.env: dict[str, str] = {}
        self.keep_alive_s = 900
        self.kind: dict[int, str] = {}  # idle pid -> the kind of the round that started it
        self.asked = 0
        self.misses = 0  # rounds in a row that started no worker
        self.last_job = time.monotonic()  # when a job was last seen running (or attached)
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, name="mlops-pool", daemon=True).start()

    def configure(self, sizes: dict[str, int], environ: dict[str, str],
                  keep_alive_s: int) -> None:
        """`environ`: the job's `driver_env()`; the Train runtime_env is read from it here."""
        env = train_env_vars(environ)
        with self.lock:
            self.sizes = {k: n for k, n in sizes.items() if n > 0 and (env or k == "tasks")}
            if (env or {}) != self.env:  # its train workers no longer fit: leave them be
                self.kind = {pid: "stale" if k != "tasks" else k for pid, k in self.kind.items()}
            self.env, self.keep_alive_s = env or {}, keep_alive_s
            self.last_job = time.monotonic()

    def refilling(self, now: float) -> bool:
        """Refill only within keep_alive_s of the last job: an idle warm Ray's pool then ends
        with its workers' keep-alive instead of being started again every keep_alive_s."""
        return now - self.last_job < self.keep_alive_s

    def _loop(self) -> None:
        import ray
        from ray._private.state import jobs
        stub, quiet_since = None, None
        while True:
            time.sleep(0.5)
            with contextlib.suppress(Exception):  # the next turn tries again
                stub = stub or _stub()
                if any(not j.get("IsDead", True) for j in jobs()):
                    quiet_since, self.last_job = None, time.monotonic()  # it has the CPUs
                    continue
                quiet_since = quiet_since or time.monotonic()
                # not in the gap between two jobs of a script: a round cannot be called back
                if time.monotonic() - quiet_since >= QUIET_S and self.refilling(
                        time.monotonic()):
                    self._round(stub, max(1, int(ray.cluster_resources().get("CPU", 1))))

    def _round(self, stub: Any, per_round: int) -> None:
        """One PrestartWorkers call for the kind that lacks the most: the raylet starts at most
        its startup concurrency (its CPU count) at a time and drops the rest of a request.
        Waits (up to 30 s) for them to be idle and records their pids as that kind."""
        from ray.core.generated import common_pb2, node_manager_pb2
        idle = idle_of_no_job(stub)
        with self.lock:
            self.kind = {pid: k for pid, k in self.kind.items() if pid in idle}
            have = {k: sum(1 for v in self.kind.values() if v == k) for k in self.sizes}
            # Ray's own prestart (the empty runtime_env) or a worker it could not place
            have["tasks"] = have.get("tasks", 0) + len(idle - set(self.kind))
            lacking = [(n - have[k], k) for k, n in self.sizes.items() if n > have[k]]
            if not lacking:
                return
            want, kind = max(lacking)
            n = min(want, per_round)
            extra = ({"runtime_env_info": _runtime_env_info(kind, self.env)}
                     if kind != "tasks" else {})
            keep_alive_s = self.keep_alive_s
        request = node_manager_pb2.PrestartWorkersRequest(  # type: ignore[attr-defined]
            language=common_pb2.Language.PYTHON,  # type: ignore[attr-defined]
            keep_alive_duration_secs=keep_alive_s, num_workers=n, **extra)
        stub.PrestartWorkers(request, timeout=10)
        deadline = time.monotonic() + 30
        new: set[int] = set()
        while len(new) < n and time.monotonic() < deadline:
            time.sleep(0.2)
            new = idle_of_no_job(stub) - idle
        with self.lock:
            self.asked += n
            self.kind.update(dict.fromkeys(new, kind))
            self.misses = 0 if new else self.misses + 1
        if not new:  # none came (a runtime_env that fails, a raylet that drops them): back off
            time.sleep(min(300.0, 5.0 * 2 ** self.misses))


NAME, NAMESPACE = "mlops-pool-keeper", "mlops"


def keeper() -> Any:
    """The warm Ray's keeper: the running one, else started (detached; it needs no CPU)."""
    import ray
    return ray.remote(Keeper).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=4).remote()


def keep_ready(sizes: dict[str, int], keep_alive_s: int) -> None:
    """Tell the keeper the sizes this job wants ready for the next one, and the runtime_env
    its Train actors get (from this process's environment, after `ray.env_vars`): on a
    thread, so that the job does not wait for it (a speed-up only: it never fails a job)."""
    environ = driver_env()

    def tell() -> None:
        with contextlib.suppress(Exception):
            keeper().configure.remote(sizes, environ, keep_alive_s)
    threading.Thread(target=tell, name="mlops-pool", daemon=True).start()


def idle_pids(temp_dir: str) -> set[int]:
    """Pids of the warm cluster's idle workers, read from /proc (Linux): no driver attaches,
    which would pause the keeper."""
    from pathlib import Path

    from mlops_ray import warm
    out = set()
    for pid in warm._pids(temp_dir):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::IDLE"):
                out.add(pid)
    return out


def _cpu_s(pids: set[int]) -> float:
    import os
    from pathlib import Path
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_full(temp_dir: str, want: int | None = None, timeout_s: float = 240,
              settled: bool = True) -> set[int]:
    """Wait until the warm cluster holds `want` idle workers (default: `configured_size()`)
    and, if `settled`, they have finished importing their preloaded modules (under 5% of a CPU
    over a second). Returns the idle pids then, or at the timeout."""
    want = configured_size() if want is None else want
    deadline = time.monotonic() + timeout_s
    while True:
        idle = idle_pids(temp_dir)
        if len(idle) >= want:
            before = _cpu_s(idle)
            time.sleep(1.0)
            if not settled or _cpu_s(idle) - before < 0.05:
                return idle
        if time.monotonic() > deadline:
            return idle
        time.sleep(0.5)


def configured_size() -> int:
    """How many idle workers conf/ray/local.yaml's `warm_pool` asks for, in all."""
    from mlops_ray import warm
    return sum((warm.conf_defaults().get("warm_pool") or {}).values())
