"""`cluster=remote`: a job submits itself to a Ray cluster through the Jobs API.

The entrypoint is the same command with the same overrides plus `cluster=local`, run by the
cluster's Python in an uploaded copy of this checkout (`runtime_env.working_dir`), where Ray sets
RAY_ADDRESS so the job joins that cluster. Logs are streamed here; the exit code is the remote
job's (0 SUCCEEDED, its driver's exit code when FAILED, 130 when STOPPED). Ctrl-C stops the
remote job and waits until Ray reports it stopped.

Ray 2.60 token auth: a separate client process must set RAY_AUTH_MODE=token and have the token
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); this module sets the mode when a
token is available.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlops_ray.config.base import ClusterCfg
from mlops_ray.errors import SubmissionError

EXIT = {"SUCCEEDED": 0, "STOPPED": 130}


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())


def entrypoint(module: str, overrides: list[str], python: str) -> str:
    """The remote command: the overrides without cluster.* and ray.env_vars.* (those travel in
    the runtime_env) and without URL passwords (the cluster's own credential chain, e.g.
    PGPASSWORD or ~/.pgpass, supplies them): the dashboard shows the entrypoint to anybody."""
    kept = [strip_password(o) for o in overrides
            if not o.lstrip("+~").startswith(("cluster", "ray.env_vars"))]
    return " ".join([shlex.quote(python), "-m", module, *map(shlex.quote, kept),
                     "cluster=local"])


def strip_password(override: str) -> str:
    from mlops_ray.config.base import _URL_PASSWORD
    return _URL_PASSWORD.sub(r"\g<head>@", override)


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def submit_if_remote(module: str, job: Any) -> None:
    """With cluster=remote, run this very command on the cluster and exit with its status."""
    if job.cluster.mode == "remote":
        sys.exit(submit(module, sys.argv[1:], job.cluster))


def submit(module: str, overrides: list[str], cfg: ClusterCfg, log: Any = print) -> int:
    """Submit `python -m module overrides... cluster=local`, follow it, return its exit code."""
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobStatus, JobSubmissionClient

    from mlops_ray.config.base import SECRET_EXCLUDES
    env_vars = {o.split("=", 1)[0].lstrip("+").removeprefix("ray.env_vars."): o.split("=", 1)[1]
                for o in overrides if o.lstrip("+").startswith("ray.env_vars.") and "=" in o}
    runtime_env: dict[str, Any] = {
        "working_dir": str(Path(cfg.working_dir).resolve() if cfg.working_dir
                           else project_root()),
        "excludes": list(dict.fromkeys([*cfg.excludes, *SECRET_EXCLUDES])),
        "env_vars": {"PYTHONUNBUFFERED": "1", **env_vars, **cfg.env_vars}}
    if cfg.pip:
        runtime_env["pip"] = list(cfg.pip)
    deadline = time.monotonic() + 120
    while True:
        try:
            client = JobSubmissionClient(cfg.address)
            job_id = client.submit_job(
                entrypoint=entrypoint(module, overrides, cfg.python), runtime_env=runtime_env,
                entrypoint_num_cpus=cfg.entrypoint_num_cpus,
                entrypoint_resources=cfg.entrypoint_resources or None)
            break
        except Exception as e:  # noqa: BLE001 - connection, auth and validation errors alike
            # a head that just started answers before its job agent is up: wait for it
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmissionError(f"cluster.address={cfg.address}: the job was not "
                                  f"submitted ({type(e).__name__}: {e})") from None
    log(f"submitted {job_id} to {cfg.address} (stop it with Ctrl-C)")
    shown = 0
    final = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    # an explicit handler: a process started in the background inherits SIGINT ignored
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stopping = False
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in final:
            break
        if stop.is_set() and not stopping:
            stopping = True
            log(f"stopping {job_id} ...")
            client.stop_job(job_id)
        stop.wait(cfg.poll_s)
    info = client.get_job_info(job_id)
    log(f"job {job_id} {status.value}" + (f": {info.message}" if info.message else ""))
    if status == JobStatus.FAILED:
        return int(getattr(info, "driver_exit_code", None) or 1)
    return EXIT[status.value]
