"""The README's commands as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import run_job

pytestmark = pytest.mark.slow


def test_cfg_job_prints_the_composed_config():
    out = run_job(["jobs.train", "+experiment=adult_mlp", "--cfg", "job"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert "name: adult_mlp" in out.stdout and "num_workers: 1" in out.stdout


def test_bad_config_one_clear_error_nothing_written(tmp_path):
    """(Each kind of config error, in process: tests/unit/test_config.py.)"""
    store = tmp_path / "store"
    out = run_job(["jobs.train", "+experiment=adult_mlp", f"storage.uri={store}",
                   "train.batch_size=513", "scaling.num_workers=2",
                   "scaling.resources_per_worker.CPU=0.5"], timeout=60)
    assert out.returncode == 2
    assert "train.batch_size=513 is not divisible by scaling.num_workers=2" in out.stderr
    assert "Traceback" not in out.stderr
    assert not store.exists(), "validation failed but something was written to storage"


def test_bad_data_lists_every_violation_nothing_written(tmp_path):
    import pandas as pd
    df = pd.read_parquet(Path("mlops_ray/data/builtin/german.parquet").resolve())
    df.loc[0, "age"] = 7
    df.loc[1, "sex"] = "unknown"
    df["good_credit"] = df["good_credit"].replace({0: 2}).astype(object)
    df.loc[2, "good_credit"] = 5
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    store = tmp_path / "store"
    out = run_job(["jobs.train", "+experiment=german_mlp", f"dataset.uri={path}",
                   f"storage.uri={store}"], timeout=60)
    assert out.returncode == 3, out.stderr
    err = out.stderr
    assert "failed validation (3 violation(s))" in err and "below min=18" in err
    assert "'unknown'" in err and "must be binary" in err and "Traceback" not in err
    assert not store.exists()


# sha256 over (name, bytes) of the final weights of `python -m jobs.train +experiment=adult_mlp`
# (seed 0, CPU) at commit 1e82a17, before the restructuring: the same run must give the same bits
PARENT_WEIGHTS = "eee41e3e529332b1275f0013c806955e8c7ee5f2499546f65c5944756720c78a"
PARENT_RUN = "adult_mlp-e0628c78554e"


def weights_hash(state: dict) -> str:
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_make_train_job_standalone_gives_the_parents_weights(ray_2_cpus, tmp_path):
    """`make train`'s job on a throwaway Ray of its own (`ray.address=local`; Ray's own auth
    defaults) while another Ray cluster (the test session's) runs on this machine and is its
    default: Adult to held-out
    test AUC >= 0.90, the very weights (and run name) the code before the restructuring
    trained, nothing of it attached to the other cluster, and a quiet console."""
    import torch

    from mlops_ray.train.driver import summary_lines
    from tests.conftest import read_ray_address_file
    assert read_ray_address_file() == ray_2_cpus  # the other cluster is this machine's default
    out = run_job(["jobs.train", "+experiment=adult_mlp", f"storage.uri={tmp_path}",
                   "tracking=none", "ray.address=local"], timeout=600, RAY_AUTH_MODE=None,
                  RAY_AUTH_TOKEN=None, RAY_ADDRESS=None)
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    for noise in ("Found multiple active Ray instances",  # a helper looking for its cluster
                  "Failed to query Ray Train Controller",  # the PG cleaner, asking the other one
                  "Reporting training result", "TrainingReport(", "PreemptionWatcher",
                  "Token authentication is enabled"):
        assert noise not in console, f"{noise!r} in the console:\n{console[-3000:]}"
    (record_path,) = tmp_path.glob("runs/adult_mlp-*/run.json")
    rec = json.loads(record_path.read_text())
    assert rec["status"] == "finished" and rec["test"]["test/auc"] >= 0.90
    for where in ("checkpoint", "run record", "test       auc"):
        assert where in out.stdout
    assert str(record_path.parent) in out.stdout
    assert rec["run_name"] == PARENT_RUN
    # one line per epoch (the README's promise; Ray forwards them from the Train controller,
    # in their own time), and the summary; nothing else
    lines = out.stdout.splitlines()
    assert len([x for x in lines if "[mlops_ray] epoch" in x]) == len(rec["history"])
    header, *rest = [x for x in lines if "[mlops_ray] epoch" not in x]
    assert header.startswith(f"run {rec['run_name']}: starting in {rec['run_uri']}") \
        and [x.split()[0] for x in rest] == [x.split()[0] for x in summary_lines(rec)], \
        out.stdout  # (the record on disk has its keys sorted)
    # on stderr, one line: that this run did not join the other cluster, and how it could
    (warning,) = out.stderr.splitlines()
    assert re.fullmatch(rf"warning: another Ray cluster \({ray_2_cpus}\) is this machine's "
                        rf"default; this run uses a new local one \(\S+\)\. To use that "
                        rf"cluster instead, set ray.address={ray_2_cpus}", warning), warning
    latest = Path(rec["checkpoints"]["latest"].removeprefix("file://"), "state.pt")
    state = torch.load(latest, map_location="cpu", weights_only=False)["model"]
    assert weights_hash(state) == PARENT_WEIGHTS


def test_serve_cli_answers_then_stops_on_ctrl_c(tmp_path):
    """`python -m jobs.serve ref=adult_mlp ray.address=local`: a throwaway Ray of its own, served
    until Ctrl-C."""
    import json
    import signal
    import subprocess
    import sys

    import requests

    from mlops_ray.data import prepare
    from mlops_ray.registry import Policy, Registry
    from mlops_ray.storage import resolve
    from tests.conftest import REPO, dataset, free_port, job_env, wait_until
    from tests.serving import make_version
    reg = Registry(f"sqlite:///{tmp_path / 'mlops_ray.db'}", resolve(str(tmp_path)),
                   Policy.default())
    prepared = prepare(dataset("adult_mlp"), 0)
    v = make_version(reg, prepared, 0)
    reg.set_alias("adult_mlp", "production", v.version, expected=None)
    bad = run_job(["jobs.serve", "ref=adult_mlp@nope", f"storage.uri={tmp_path}"])
    assert bad.returncode == 6 and "adult_mlp@nope: no such alias" in bad.stderr
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # a file, not a pipe: Ray's logs would fill a pipe
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "ref=adult_mlp",
                             f"storage.uri={tmp_path}", f"serve.port={port}", "ray.num_cpus=2",
                             "ray.include_dashboard=false", "ray.address=local"], cwd=REPO,
                            env=job_env(RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None),
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return requests.get(url + "/v2/health/ready", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_until(ready, 180, interval=1, what="jobs.serve to answer")
        wait_until(lambda: "endpoint   http" in (tmp_path / "serve.log").read_text(), 60,
                   what="jobs.serve to print its endpoint")
        rec = json.loads(prepared.frame[[c for c in prepared.frame.columns
                                         if c not in ("income", "uci_split")]]
                         .head(1).to_json(orient="records"))
        r = requests.post(url + "/predict", json={"records": rec}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == v.version, r.text
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "endpoint   http://127.0.0.1" in out and "stopped" in out
    deploys = [a for a in reg.audit_log("adult_mlp") if a["action"] == "deploy"]
    assert deploys and json.loads(deploys[-1]["details"])["arms"] == [v.ref]


@pytest.fixture
def ray_head(tmp_path):
    """A real head (`ray start --head --block`, token auth, 127.0.0.1), stopped by the test
    through its own process handle."""
    import secrets
    import signal
    import subprocess
    import sys

    import requests

    from tests.conftest import free_port, job_env, wait_until
    token = secrets.token_hex(16)
    env = job_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    dash, gcs_port = free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs_port}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
                             # free ports, not Ray's fixed defaults (52365...): another Ray on
                             # this machine (the test session's own) would hold those
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}",
                             f"--metrics-export-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}",
                             f"--ray-client-server-port={free_port()}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "head.log", "w"), start_new_session=True)
    url = f"http://127.0.0.1:{dash}"

    def up():
        try:
            return requests.get(url + "/api/version", timeout=2,
                                headers={"Authorization": f"Bearer {token}"}).ok
        except requests.RequestException:
            return False
    try:
        wait_until(up, 120, interval=1, what="the head's Jobs API")
        yield {"url": url, "env": {"RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": None}}
    finally:
        # `ray start --block` stops its processes on SIGTERM, gracefully (~30 s); the test is
        # done with them: what is left after 5 s is killed, the whole group this test started
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        # `ray start` made this head the machine's default cluster; a stale default would send
        # Ray Train's placement-group cleaner (in later runs) to a dead GCS
        from ray._private.utils import get_ray_address_file, read_ray_address
        if read_ray_address() == f"127.0.0.1:{gcs_port}":
            os.remove(get_ray_address_file(None))


def test_cluster_remote_submits_streams_and_stops(ray_head, tmp_path):
    """`jobs.train cluster=remote` against a real head: logs streamed, exit code of the job;
    Ctrl-C stops the remote job and reports it stopped."""
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO, job_env, wait_until
    common = ["+experiment=german_mlp", "tracking=none", f"storage.uri={tmp_path / 'out'}",
              "cluster=remote", f"cluster.address={ray_head['url']}",
              f"cluster.python={sys.executable}"]
    out = run_job(["jobs.train", *common, "train.epochs=1"], timeout=600, **ray_head["env"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "submitted raysubmit_" in out.stdout and "SUCCEEDED" in out.stdout
    assert "run record" in out.stdout  # the remote job's own summary, streamed here
    assert list((tmp_path / "out" / "runs").glob("german_mlp-*/run.json"))
    log = tmp_path / "stop.log"
    from mlops_ray.train.gate import Gate
    gate = Gate(tmp_path / "gate")
    gate.hold(epoch=1, step=2)  # the remote run waits there: it cannot end before the Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *common, "train.epochs=3",
                             f"+cluster.env_vars.MLOPS_RAY_STEP_GATE={gate.folder}",
                             "name=long"], cwd=REPO, env=job_env(**ray_head["env"]),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: gate.events("waiting") or proc.poll() is not None, 300, interval=1,
                   what="the remote training held at epoch 1")
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 130 and "STOPPED" in text, text[-3000:]
    bad = run_job(["jobs.train", *common[:-3], "cluster=remote"], timeout=60)
    assert bad.returncode == 2 and "cluster.address" in bad.stderr
