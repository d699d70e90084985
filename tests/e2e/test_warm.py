"""The checkout's warm local Ray (#20): the first job starts it, the next attaches (no Ray start)
and finds its Train controller and worker processes ready (mlops_ray/pool.py), another checkout
gets a cluster of its own, and stopping one touches no other Ray."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, job_env

pytestmark = pytest.mark.slow


def train(out, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.train", "+experiment=adult_mlp",
                           "train.epochs=1", "tracking=none", f"storage.uri={out}"], cwd=REPO,
                          env=job_env(RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None, RAY_ADDRESS=None,
                                      **env),
                          capture_output=True, text=True, timeout=600)


def daemons(tmp: str) -> set[int]:
    """The cluster's own processes (GCS, raylet, dashboard, agents: they name its temp dir on
    their command line), not its workers: a finished job's workers exit whenever Ray gets to
    it, so comparing them would race with the machine's speed."""
    from pathlib import Path

    from mlops_ray import warm
    out = set()
    for pid in warm._pids(tmp):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # exited since it was listed
            continue
        # a worker names the temp dir too while it starts, until Ray retitles it
        if tmp.encode() in cmd and b"default_worker.py" not in cmd:
            out.add(pid)
    return out


def title(pid: int) -> bytes:
    from pathlib import Path
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].strip()
    except OSError:
        return b""


def maps_torch(pid: int) -> bool:
    """Whether the process has torch imported (its shared library mapped)."""
    from pathlib import Path
    return b"libtorch_cpu" in Path(f"/proc/{pid}/maps").read_bytes()


def actor_pids(folder, class_name: str) -> set[int]:
    """Pids of the warm cluster's actors of this class, dead ones included (State API, from a
    process of its own: this one is attached to the test session's Ray)."""
    code = ("import json, os, sys; from mlops_ray import warm; "
            "from ray._private.authentication.authentication_token_setup import "
            "_enable_token_auth; _enable_token_auth(); from ray.util.state import list_actors; "
            "print(json.dumps([a['pid'] for a in list_actors(address=warm.read_state()"
            "['dashboard_url'], filters=[('class_name', '=', sys.argv[1])], detail=True, "
            "raise_on_missing_output=False)]))")
    from mlops_ray import warm
    out = subprocess.run([sys.executable, "-c", code, class_name], cwd=REPO,
                         env=job_env(MLOPS_RAY_WARM_DIR=str(folder), RAY_AUTH_TOKEN=None,
                                     RAY_ADDRESS=None, **warm.client_env(folder)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_jobs_attach_to_the_warm_ray_and_checkouts_do_not_share_one(ray_2_cpus, tmp_path,
                                                                      warm_ray):
    import ray

    from mlops_ray import pool, warm
    first = train(tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting the warm local Ray of this checkout" in first.stderr
    state = warm.read_state(warm_ray)
    assert state and warm.running(warm_ray) and state["address"].startswith("127.0.0.1:")
    assert oct((warm_ray / "auth_token").stat().st_mode & 0o777) == "0o600"
    pids = daemons(state["temp_dir"])
    assert pids  # the cluster outlived the job that started it
    # the keeper refills the pool once no job runs; its idle workers import torch (preloaded),
    # a worker started for a job's own work does not (the keeper itself: an actor of no torch)
    ready = pool.wait_full(state["temp_dir"])
    assert len(ready) >= pool.configured_size(), f"{len(ready)} idle workers"
    assert all(maps_torch(pid) for pid in ready)
    (keeper,) = [p for p in warm._pids(state["temp_dir"]) if title(p) == b"ray::Keeper"]
    assert not maps_torch(keeper)

    second = train(tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    # its Train controller and worker took processes that were idle before it started (started
    # with the runtime_env Ray Train gives each), instead of starting and importing new ones
    assert actor_pids(warm_ray, "TrainController") & ready
    assert actor_pids(warm_ray, "RayTrainWorker") & ready
    assert "starting the warm local Ray" not in second.stderr  # attached: no Ray start
    assert warm.read_state(warm_ray) == state and daemons(state["temp_dir"]) >= pids
    (rec,) = (tmp_path / "b").glob("runs/adult_mlp-*/run.json")
    assert json.loads(rec.read_text())["status"] == "finished"

    # another checkout: its own folder, token, ports and Ray temp dir
    other = tmp_path / "other-checkout"
    started = subprocess.run([sys.executable, "-m", "mlops_ray.warm", "start"], cwd=REPO,
                             env=job_env(MLOPS_RAY_WARM_DIR=str(other), RAY_AUTH_TOKEN=None),
                             capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        theirs = warm.read_state(other)
        assert theirs["address"] != state["address"]
        assert theirs["temp_dir"] != state["temp_dir"]
        assert (other / "auth_token").read_text() != (warm_ray / "auth_token").read_text()
        # stopping this checkout's Ray leaves the other one and the test session's alone
        stopped = warm.stop(warm_ray, quiet=True)
        assert set(stopped) >= pids and not warm.running(warm_ray)
        assert not warm._pids(state["temp_dir"])
        assert warm.running(other)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2.0
    finally:
        warm.stop(other, quiet=True)
    assert not warm.running(other)
