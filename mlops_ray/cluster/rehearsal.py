"""Rehearse node loss and spot preemption on one machine before paying for a cloud cluster.

`LocalCluster` is a head plus spot worker nodes (`ray.cluster_utils.Cluster`: real raylets on
127.0.0.1, each worker node offering the `spot` resource as the cluster YAMLs do), and
`FakeMetadata` plays the cloud's instance-metadata service for the spot watcher. The multi-node
tests and `bench/preemption.py` are built from these two.

`add_node`/`remove_node` must run on the main thread (Ray installs signal handlers), so the
training driver runs in a thread (`Background`) and the main thread injects the faults.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class LocalCluster:
    """Head (`head_cpus`, no spot resource) + `workers` spot nodes of `worker_cpus` each."""

    def __init__(self, workers: int = 2, head_cpus: int = 1, worker_cpus: int = 1,
                 dashboard: bool = False) -> None:
        self.n, self.head_cpus, self.worker_cpus = workers, head_cpus, worker_cpus
        self.dashboard = dashboard  # Ray's state API (ray.util.state) goes through it
        self.workers: list[Any] = []

    def __enter__(self) -> LocalCluster:
        import ray
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        from mlops_ray.runtime import claim_address_file
        # Everything on loopback: Ray rewrites a 127.0.0.1 address to the machine's outward IP
        # unless it runs "single-machine" (the flag it uses on macOS/Windows); processes
        # started from here (raylets, workers) inherit the variable.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        head: dict[str, Any] = {"num_cpus": self.head_cpus, "include_dashboard": self.dashboard,
                                "node_ip_address": "127.0.0.1"}
        if self.dashboard:
            import socket
            with socket.socket() as sock:  # not 8265: a user's own Ray may hold it
                sock.bind(("127.0.0.1", 0))
                head.update(dashboard_host="127.0.0.1", dashboard_port=sock.getsockname()[1])
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        for _ in range(self.n):
            self.add(wait=False)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level=logging.WARNING)
        claim_address_file(self.cluster.address)
        # the driver (and so the Train controller) must live on the head, which never dies here
        head_node = self.cluster.head_node  # Ray types it None (set in start)
        assert ray.get_runtime_context().get_node_id() == \
            head_node.node_id  # type: ignore[attr-defined]
        return self

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, wait: bool = True) -> Any:
        node = self.cluster.add_node(num_cpus=self.worker_cpus, resources={"spot": 1},
                                     node_ip_address="127.0.0.1")
        self.workers.append(node)
        if wait:
            self.cluster.wait_for_nodes()
        return node

    def node(self, node_id: str) -> Any:
        """The worker node with this id (hex, as Ray's state API and runtime context give it)."""
        found = [n for n in self.workers if n.node_id == node_id]
        if not found:
            raise KeyError(f"no live worker node {node_id}")
        return found[0]

    def kill(self, node: Any) -> float:
        """Hard loss of a node (no drain, like a VM pulled away); returns the time it died."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        return time.time()

    def __exit__(self, *exc: Any) -> None:
        import ray
        ray.shutdown()
        self.cluster.shutdown()


class Background:
    """Run `fn()` in a thread; `.result()` re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = e
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"still running after {timeout} s")
        if self.error:
            raise self.error
        return self.value


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
             abort: Callable[[], bool] | None = None) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if v := cond():
            return v
        if abort and abort():
            raise RuntimeError(f"gave up waiting for {what}: the run ended first")
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


def checkpoints(run_dir: str | Path) -> list[str]:
    """Committed-looking checkpoint folders (all three files written), oldest first."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.glob("checkpoint_e*_s*")
                  if all((p / f).exists() for f in ("state.pt", "meta.json", "preprocessor.json")))


def read_step_log(path: str | Path) -> list[tuple[float, str, int, int, str]]:
    """(unix time, event, epoch, step, extra) lines written under MLOPS_RAY_STEP_LOG."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((float(parts[0]), parts[1], int(parts[2]), int(parts[3]),
                        parts[4] if len(parts) > 4 else ""))
    return out


class FakeMetadata:
    """Answers like AWS's / GCP's / Azure's instance metadata; `notify(seconds)` switches an
    interruption notice on, due `seconds` from then."""

    def __init__(self) -> None:
        self.notice: float | None = None  # unix time of the interruption
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        meta = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                meta.seen.append((method, self.path, dict(self.headers)))
                code, body = meta.route(method, self.path, self.headers)
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._answer("GET")

            def do_PUT(self) -> None:  # noqa: N802
                self._answer("PUT")

            def log_message(self, *args: Any) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notify(self, in_s: float) -> None:
        self.notice = time.time() + in_s

    def route(self, method: str, path: str, headers: Any) -> tuple[int, str]:
        when = datetime.fromtimestamp(self.notice, timezone.utc) if self.notice else None
        if path == "/latest/api/token" and method == "PUT":
            return 200, "tok-1"
        if path == "/latest/meta-data/spot/instance-action":
            if headers.get("X-aws-ec2-metadata-token") != "tok-1":
                return 401, ""
            return (200, json.dumps({"action": "terminate",
                                     "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})) \
                if when else (404, "")
        if path == "/computeMetadata/v1/instance/preempted":
            if headers.get("Metadata-Flavor") != "Google":
                return 403, ""
            return 200, "TRUE" if when else "FALSE"
        if path.startswith("/metadata/scheduledevents"):
            events = [{"EventType": "Preempt",
                       "NotBefore": when.strftime("%a, %d %b %Y %H:%M:%S GMT")}] \
                if when else [{"EventType": "Reboot", "NotBefore": ""}]
            return 200, json.dumps({"Events": events})
        return 404, ""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
