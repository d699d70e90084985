"""`make run` as a user runs it: the pipeline on the checkout's warm Ray (the first run starts it).
Killed during evaluation, the rerun attaches to the same Ray and resumes there (training
skipped, finished folds reused), ends with a served model that stays after the job, which
jobs.monitor finds from another terminal; `make stop` ends it all."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.conftest import REPO, free_port, job_env, wait_until

pytestmark = pytest.mark.slow


def make_run(tmp_path, name: str, *args: str, **env: str | None
             ) -> tuple[subprocess.Popen, object]:
    log = tmp_path / name
    quick = ["+profile=ci", "cv.max_parallel=1", f"storage.uri={tmp_path / 'out'}", *args]
    proc = subprocess.Popen(["make", "-s", "run", "ARGS=" + " ".join(quick)], cwd=REPO,
                            env=job_env(RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None, **env),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: make, python and Ray
    return proc, log


def test_make_run_killed_during_evaluation_resumes_there_and_serves(tmp_path, warm_ray):
    from mlops_ray.train.gate import Gate
    port = free_port()
    gate = Gate(tmp_path / "gate")
    # the training run and the first fold go through; the second fold waits to be killed
    # (folds start after training here: beside it, which reaches the gate first is a race)
    gate.hold(epoch=0, step=5, let_pass=2)
    proc, log = make_run(tmp_path, "first.log", f"serve.port={port}", "cv.during_training=false",
                         **gate.env)
    try:
        wait_until(lambda: "  fold 0" in log.read_text() and gate.events("waiting")
                   or proc.poll() is not None, 600, interval=0.5,
                   what="the first fold done, the second held")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole pipeline, mid-evaluation
        proc.wait(60)
    first = log.read_text()
    assert "== [2/5] evaluate" in first and "== [3/5] promote" not in first

    from mlops_ray import warm
    state = warm.read_state(warm_ray)
    assert state and warm.running(warm_ray)  # the killed run's Ray is still up
    proc, log = make_run(tmp_path, "second.log", f"serve.port={port}", MLOPS_RAY_STEP_GATE=None)
    try:
        proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "serving on this checkout's warm Ray after this job ends" in text
    assert "starting the warm local Ray" not in text  # it attached to the first run's
    assert warm.read_state(warm_ray) == state
    assert "   skipped: finished run with this config and data" in text
    assert "reused)" in text  # cross-validation went on from the killed run's folds
    (path,) = (tmp_path / "out" / "runs").glob("adult_mlp-*/pipeline.json")
    record = json.loads(path.read_text())
    status = {e["stage"]: e["status"] for e in record["stages"]}
    assert status == {"train": "skipped", "evaluate": "done", "promote": "done",
                      "deploy": "done", "smoke": "done"}, text[-3000:]
    assert record["serving"]["version"] == "adult_mlp:1"
    rows = [{"age": 39, "workclass": "State-gov", "fnlwgt": 77516, "education": "Bachelors",
             "education_num": 13, "marital_status": "Never-married",
             "occupation": "Adm-clerical", "relationship": "Not-in-family", "race": "White",
             "sex": "Male", "capital_gain": 2174, "capital_loss": 0, "hours_per_week": 40,
             "native_country": "United-States"}]
    url = f"http://127.0.0.1:{port}/predict"
    r = requests.post(url, json={"records": rows}, timeout=30)  # after the job ended
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    # a second terminal: jobs.monitor attaches to the same warm Ray, no address named
    mon = subprocess.run([sys.executable, "-m", "jobs.monitor", "+experiment=adult_mlp",
                          f"storage.uri={tmp_path / 'out'}", "monitor.new_data=unused.parquet",
                          "monitor.once=true", "tracking=none"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=job_env(RAY_AUTH_MODE=None,
                                                             RAY_AUTH_TOKEN=None))
    assert mon.returncode == 0, mon.stdout[-2000:] + mon.stderr[-3000:]
    assert "adult_mlp:1: no drift past the thresholds" in mon.stdout
    stop = subprocess.run(["make", "-s", "stop"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=job_env())
    assert stop.returncode == 0 and "stopped the warm Ray" in stop.stdout, stop.stderr[-2000:]
    assert not warm.running(warm_ray)
    with pytest.raises(requests.ConnectionError):
        requests.post(url, json={"records": rows}, timeout=10)
