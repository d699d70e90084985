"""The checkout's warm local Ray (#20): the first job starts it, the next attaches (no Ray start),
another checkout gets a cluster of its own, and stopping one touches no other Ray."""
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


def test_jobs_attach_to_the_warm_ray_and_checkouts_do_not_share_one(ray_2_cpus, tmp_path,
                                                                      warm_ray):
    import ray

    from mlops_ray import warm
    first = train(tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting the warm local Ray of this checkout" in first.stderr
    state = warm.read_state(warm_ray)
    assert state and warm.running(warm_ray) and state["address"].startswith("127.0.0.1:")
    assert oct((warm_ray / "auth_token").stat().st_mode & 0o777) == "0o600"
    pids = daemons(state["temp_dir"])
    assert pids  # the cluster outlived the job that started it

    second = train(tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
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
