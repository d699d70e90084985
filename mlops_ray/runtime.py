"""Start or join Ray, and describe the code and library versions of a run."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


_FACTS: dict[str, Any] = {}  # of the ray.init this process made


def ensure_ray(ray_cfg: dict[str, Any]) -> dict[str, Any]:
    """ray.init once per process from the `ray` config section; returns cluster facts.

    `ray.address`: null (default) attaches to this checkout's warm local Ray, starting it first
    if none runs (mlops_ray/warm.py); `local` starts a throwaway Ray inside this process;
    `auto` or host:port joins a running cluster. Inside a Ray job, RAY_ADDRESS wins."""
    for k, v in ray_cfg.get("env_vars", {}).items():
        os.environ.setdefault(k, str(v))  # before ray.init so the raylet and workers inherit it
    import ray
    if not ray.is_initialized():
        address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS") or "warm"
        kw: dict[str, Any] = {"log_to_driver": True, "configure_logging": True,
                              "logging_level": "WARNING"}
        state: dict[str, Any] = {}
        if address == "warm":
            from mlops_ray import warm
            state = warm.ensure(ray_cfg, log=lambda m: print(m, file=sys.stderr))
            # its own token, whatever token another cluster's clients hold in this environment
            os.environ.pop("RAY_AUTH_TOKEN", None)
            os.environ.update(warm.client_env())
            _FACTS["dashboard_url"] = state["dashboard_url"]
            if state.get("fresh"):  # once per cluster, not on every attach
                _install_dashboard(f"{state['temp_dir']}/session_latest")
            address = state["address"]
            if not state.get("pinned"):  # started by an older version: its workers need it
                kw["runtime_env"] = {"worker_process_setup_hook": "mlops_ray.runtime.pin_address"}
        elif "RAY_AUTH_MODE" not in os.environ and (address == "local" or (
                os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())):
            # Ray 2.60: a client process must opt in; a local cluster has token auth by default
            # and says so in a warning on every start: choose it explicitly instead (the same
            # setting, no warning; RAY_AUTH_MODE=disabled still opts out)
            os.environ["RAY_AUTH_MODE"] = "token"
        if "RAY_AUTH_MODE" in os.environ:
            # Ray caches its config at import: refresh it the way Ray's own auto-enable does
            from ray._private.authentication.authentication_token_setup import (
                _enable_token_auth,
            )
            if os.environ["RAY_AUTH_MODE"] == "token":
                _enable_token_auth()
        if address == "local":  # a throwaway cluster inside this process
            # every worker of this job talks to this cluster only (see pin_address)
            kw["runtime_env"] = {"worker_process_setup_hook": "mlops_ray.runtime.pin_address"}
            kw.update(num_cpus=ray_cfg.get("num_cpus"), num_gpus=ray_cfg.get("num_gpus"),
                      include_dashboard=ray_cfg.get("include_dashboard", True),
                      dashboard_host=ray_cfg.get("dashboard_host", "127.0.0.1"),
                      _node_ip_address="127.0.0.1")  # a laptop cluster listens on loopback only
        ctx = ray.init(address=address, **kw)
        _drop_known_harmless_lines()
        if state.get("pinned") and any((ray_cfg.get("warm_pool") or {}).values()):
            from mlops_ray import pool  # idle workers for the next job (pool.py)
            pool.keep_ready(dict(ray_cfg["warm_pool"]),
                            int(ray_cfg.get("warm_pool_keep_alive_s", 900)))
        if address == "local":
            # ray.init is typed BaseContext; a local init returns a RayContext
            claim_address_file(ctx.address_info["gcs_address"])  # type: ignore[attr-defined]
            if kw.get("include_dashboard"):
                _install_dashboard(ctx.address_info["session_dir"])  # type: ignore[attr-defined]
            dash = getattr(ctx, "dashboard_url", None)
            _FACTS["dashboard_url"] = f"http://{dash}" if dash else None
        elif "dashboard_url" not in _FACTS:
            dash = getattr(ctx, "dashboard_url", None)
            _FACTS["dashboard_url"] = f"http://{dash}" if dash else None
    return {"dashboard_url": _FACTS.get("dashboard_url"),
            "address": ray.get_runtime_context().gcs_address,
            "resources": ray.cluster_resources()}


def _install_dashboard(session_dir: str) -> None:
    """The project's Grafana dashboard next to Ray's own in this session's folder, once Ray's
    dashboard has written them (it recreates the folder as it starts): in a background thread,
    so no job waits for it."""
    import threading
    import time

    def copy() -> None:
        from mlops_ray.observability import install_dashboard
        marker = Path(session_dir) / "metrics" / "grafana" / "dashboards" / \
            "default_grafana_dashboard.json"
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        with contextlib.suppress(OSError):
            install_dashboard(session_dir)
    threading.Thread(target=copy, name="mlops-dashboard", daemon=True).start()


# Lines Ray's processes print that are known to be harmless and that no Ray setting turns off
# without hiding real errors with them (the C++ core logs this one at ERROR level)
HARMLESS = (
    # ray-project/ray#53727: Ray Train's own PreemptionWatcher, restartable, with actor handles
    # as constructor arguments; printed on every run
    re.compile(r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the "
               r"object store and max_restarts > 0"),
)


def _drop_known_harmless_lines() -> None:
    """Wrap the driver's printer of worker output (Ray's log_to_driver) so that the HARMLESS
    lines are dropped; every other line, errors included, is printed as before."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs" or getattr(handler, "filtered", False):
                continue

            def filtered(data: dict[str, Any], _print: Any = handler) -> None:
                lines = [x for x in data.get("lines", [])
                         if not any(p.search(x) for p in HARMLESS)]
                if lines:
                    _print({**data, "lines": lines})
            filtered.filtered = True  # type: ignore[attr-defined]
            dispatcher.handlers[i] = (name, filtered)


def pin_address() -> None:
    """Ray worker setup hook of the local clusters we start. Ray's helpers inside workers (Ray
    Train's placement-group cleaner, the State API) find "their" cluster from RAY_ADDRESS, else
    from /tmp/ray/ray_current_cluster, which may name another cluster on this machine: they
    then queried that one ("Found multiple active Ray instances") and failed."""
    import ray
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def claim_address_file(gcs_address: str) -> None:
    """Make /tmp/ray/ray_current_cluster name the local cluster we started, unless it names a
    live one (then warn), and remove it again when this process exits.

    `ray.init(address="local")` does not write that file, but Ray Train's placement-group
    cleaner and the State API read it inside our workers. A stale one (left by a `ray start`
    head that was killed, not stopped) makes every run end with a 12 s timeout; one naming
    another live cluster points them at the wrong GCS.
    """
    import atexit
    import socket

    from ray._private.utils import get_ray_address_file, read_ray_address, write_ray_address
    current = read_ray_address()
    if current and current != gcs_address:
        host, _, port = current.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            print(f"warning: another Ray cluster ({current}) is this machine's default; this "
                  f"run uses a new local one ({gcs_address}). To use that cluster instead, set "
                  f"ray.address={current}", file=sys.stderr)
            return
        except (OSError, ValueError):
            pass  # stale: nothing answers there
    write_ray_address(gcs_address)
    path = get_ray_address_file(None)

    def release() -> None:
        if read_ray_address() == gcs_address:
            with contextlib.suppress(OSError):
                os.remove(path)
    atexit.register(release)


def code_version() -> dict[str, Any]:
    """Git commit and dirty flag of the checkout when available, else the package version."""
    from mlops_ray import __version__
    out: dict[str, Any] = {"package": __version__, "git_commit": None, "git_dirty": None}
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        out["git_commit"] = git("rev-parse", "HEAD")
        out["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def library_versions() -> dict[str, str]:
    import ray
    import torch
    return {"python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__}


def serve_until_stopped(log: Any = print, announce: bool = True) -> None:
    """A local Ray (and the apps on it) lives as long as this process: wait for Ctrl-C or
    SIGTERM, then stop Serve and Ray. An explicit handler: a process started in the
    background inherits SIGINT ignored."""
    import signal
    import threading
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if announce:
        log("serving until Ctrl-C")
    while not stop.wait(0.5):
        pass
    stop_serving(log)


def stop_serving(log: Any = print) -> None:
    import ray
    from ray import serve
    log("stopping")
    serve.shutdown()
    ray.shutdown()
    log("stopped")


def run_main(main: Any) -> None:
    """A job's `__main__`: run it, then leave without two fixed costs of a Python process that
    used Ray and torch (measured on a finished `jobs.train`: about 1.4 s of a 10 s process).

    - Ray's exit hook sleeps 0.5 s, so that a failing worker's last log lines reach the
      terminal. After a job that returned, Ray is shut down here instead, without the wait.
    - The interpreter's final garbage collection walks every object of torch, Ray and
      scikit-learn (~0.9 s). `gc.freeze()`, run last of the exit hooks, leaves them to the
      operating system: the exit hooks (Ray's, W&B's, files' flushes) still run before it."""
    import atexit
    import gc
    atexit.register(gc.freeze)  # registered first, so it runs after every other exit hook
    main()
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
