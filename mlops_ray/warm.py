"""The checkout's warm local Ray: the first job that needs Ray starts it (`ray start --head`,
token auth on, loopback only) and leaves it running; every later job of this checkout attaches
to it instead of paying for a Ray start; `make stop` ends it.

    <checkout>/.ray/warm.json     address, dashboard, ports, temp dir, the pids it started with
    <checkout>/.ray/auth_token    the cluster's token (0600): what this checkout's jobs attach with

Two checkouts never share a cluster by accident: each has its own state folder, token, ports and
Ray temp dir (`/tmp/ray-mlops-<hash of the folder>`), and a job attaches only to the address in
its own state file, with its own token (another cluster would refuse it). `ray.address=local`
gives a job its own throwaway Ray instead; `ray.address=auto|host:port` joins another cluster.

    python -m mlops_ray.warm status|start|stop
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess  # nosec B404 - `ray start` from this venv, an argument list, no shell
import sys
import time
from pathlib import Path
from typing import Any

from mlops_ray.errors import ClusterError

REPO = Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """`MLOPS_RAY_WARM_DIR`, else `<checkout>/.ray` (the checkout this code runs from)."""
    return Path(os.environ.get("MLOPS_RAY_WARM_DIR") or REPO / ".ray").resolve()


def temp_dir(folder: Path) -> str:
    # Ray's sockets live under it: keep it short (Unix socket paths are limited to ~107 bytes)
    return f"/tmp/ray-mlops-{hashlib.sha256(str(folder).encode()).hexdigest()[:10]}"  # nosec B108


def conf_defaults() -> dict[str, Any]:
    """The `ray` section a job gets by default (conf/ray/local.yaml): what `start` starts with."""
    import yaml
    return dict(yaml.safe_load((REPO / "conf/ray/local.yaml").read_text()))


def read_state(folder: Path | None = None) -> dict[str, Any] | None:
    try:
        return dict(json.loads(((folder or state_dir()) / "warm.json").read_text()))
    except (OSError, ValueError):
        return None


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except (OSError, ValueError):
        return False


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def running(folder: Path | None = None) -> bool:
    state = read_state(folder)
    return bool(state and _answers(state["address"]))


def client_env(folder: Path | None = None) -> dict[str, str]:
    """What a process attaching to the warm cluster needs (Ray 2.60: a client opts in to token
    auth and names its token)."""
    return {"RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str((folder or state_dir()) / "auth_token")}


def ensure(ray_cfg: dict[str, Any], log: Any = None) -> dict[str, Any]:
    """The warm cluster's state, started first if none answers. A lock file serialises two jobs
    starting at once: the second attaches to what the first started."""
    import fcntl
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(folder)
        if state and _answers(state["address"]):
            return state
        if state:  # its head is gone (killed, rebooted): clean what is left of it
            stop(folder, quiet=True)
        return _start(folder, ray_cfg, log)


def _start(folder: Path, ray_cfg: dict[str, Any], log: Any) -> dict[str, Any]:
    token = folder / "auth_token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    gcs, dash, client, metrics, agent, agent_grpc, runtime_env = _free_ports(7)
    tmp = temp_dir(folder)
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--temp-dir={tmp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats"]
    if ray_cfg.get("num_cpus"):
        cmd.append(f"--num-cpus={ray_cfg['num_cpus']}")
    if ray_cfg.get("num_gpus") is not None:
        cmd.append(f"--num-gpus={ray_cfg['num_gpus']}")
    env_vars = {k: str(v) for k, v in ray_cfg.get("env_vars", {}).items()}
    preload = ",".join(ray_cfg.get("preload_modules") or [])
    env = {**os.environ, **env_vars, **client_env(folder),
           # every worker imports _preload (Ray's preload_python_modules): an idle one of the
           # pool (pool.py) then imports `preload`, ready for the next job's Train actors
           "RAY_preload_python_modules": "mlops_ray._preload" if preload else "",
           "MLOPS_RAY_PRELOAD": preload,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                       os.environ.get("PYTHONPATH")])),
           # jobs.serve's defaults for a local cluster (read by Serve's controller and replicas,
           # which the raylet starts with this environment): direct ingress, a short drain
           "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}
    env.pop("RAY_AUTH_TOKEN", None)  # this cluster's own token, not another's
    # Ray's helpers inside workers (Train's placement-group cleaner, the State API) find their
    # cluster from RAY_ADDRESS: workers inherit the raylet's environment, so every job's
    # workers name this cluster without a runtime_env hook (which would keep them from
    # taking the idle workers of the pool: those have the empty runtime_env)
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    t0 = time.monotonic()
    if log:
        log(f"starting the warm local Ray of this checkout ({folder}); `make stop` ends it")
    # its own session: a Ctrl-C or kill of this job's process group leaves the cluster running
    out = subprocess.run(cmd, env=env, capture_output=True, text=True,  # nosec B603
                         timeout=180, check=False, start_new_session=True, cwd=str(folder))
    if out.returncode != 0:
        raise ClusterError(f"`ray start --head` failed ({out.returncode}):\n"
                           f"{(out.stdout + out.stderr)[-3000:]}")
    state = {"address": f"127.0.0.1:{gcs}", "dashboard_url": f"http://127.0.0.1:{dash}",
             "metrics_port": metrics, "temp_dir": tmp, "num_cpus": ray_cfg.get("num_cpus"),
             "started_s": round(time.monotonic() - t0, 2), "python": sys.executable,
             "pinned": True}  # workers find it by RAY_ADDRESS (runtime.ensure_ray)
    tmpfile = folder / f"warm.json.tmp-{os.getpid()}"
    tmpfile.write_text(json.dumps(state, indent=1))
    os.replace(tmpfile, folder / "warm.json")
    return {**state, "fresh": True}  # (not stored) this job started it


def _pids(tmp: str) -> list[int]:
    """The processes of the cluster whose Ray temp dir is `tmp`: those naming it on their command
    line (GCS, raylet, dashboard, agents) and their descendants (workers, Serve's proxy and
    replicas, whose titles Ray rewrites). /proc on Linux, psutil elsewhere (macOS)."""
    mine = os.getpid()
    if not Path("/proc/self/stat").exists():
        import psutil
        tops = [p for p in psutil.process_iter(["pid", "cmdline"])
                if p.info["pid"] != mine and any(tmp in a for a in p.info["cmdline"] or [])]
        return sorted({p.pid for p in tops} | {c.pid for p in tops
                                                for c in p.children(recursive=True)})
    parent: dict[int, int] = {}
    roots = set()
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(d.name)
            state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state in ("Z", "X"):  # dead, only not reaped yet: nothing left to stop
                continue
            parent[pid] = int(ppid)
            if pid != mine and tmp.encode() in (d / "cmdline").read_bytes():
                roots.add(pid)
    found, grew = set(roots), True
    while grew:
        kids = {p for p, pp in parent.items() if pp in found and p != mine} - found
        found |= kids
        grew = bool(kids)
    return sorted(found)


def stop(folder: Path | None = None, quiet: bool = False, grace_s: float = 10) -> list[int]:
    """Stop this checkout's warm cluster: SIGTERM to its processes (found by its temp dir, so
    no other Ray on the machine is touched), SIGKILL to those left after `grace_s`. Returns the
    pids signalled."""
    folder = folder or state_dir()
    state = read_state(folder)
    tmp = state["temp_dir"] if state else temp_dir(folder)
    pids = _pids(tmp)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pids(tmp):
        time.sleep(0.2)
    for pid in _pids(tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # a killed process is gone only once the kernel has torn it down: return after that
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pids(tmp):
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        (folder / "warm.json").unlink()
    if not quiet:
        print(f"stopped the warm Ray of {folder} ({len(pids)} processes)" if pids
              else f"no warm Ray of {folder} was running")
    return pids


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "status"
    if what == "stop":
        stop()
    elif what == "start":
        print(json.dumps(ensure(conf_defaults(), log=print), indent=1))
    elif what == "status":
        up = running()
        print(json.dumps({"running": up, **(read_state() or {})}, indent=1))
        return 0 if up else 1
    else:
        print("usage: python -m mlops_ray.warm status|start|stop", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
