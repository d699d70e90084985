"""`make run` as a user runs it: the pipeline on its own local Ray. Killed during evaluation, the
rerun resumes there (training skipped, finished folds reused), ends with a served model that
answers requests, and stops cleanly on Ctrl-C."""
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


def test_make_run_killed_during_evaluation_resumes_there_and_serves(tmp_path):
    from mlops_ray.train.gate import Gate
    port = free_port()
    gate = Gate(tmp_path / "gate")
    # the training run and the first fold go through; the second fold waits to be killed
    gate.hold(epoch=0, step=5, let_pass=2)
    proc, log = make_run(tmp_path, "first.log", f"serve.port={port}", **gate.env)
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

    proc, log = make_run(tmp_path, "second.log", f"serve.port={port}", MLOPS_RAY_STEP_GATE=None)
    try:
        wait_until(lambda: "serving until Ctrl-C" in log.read_text() or proc.poll() is not None,
                   600, interval=0.5, what="the resumed pipeline to serve")
        text = log.read_text()
        assert proc.poll() is None, text[-3000:]
        assert "   skipped: finished run with this config and data" in text
        assert "reused)" in text  # cross-validation went on from the killed run's folds
        (path,) = (tmp_path / "out" / "runs").glob("adult_mlp-*/pipeline.json")
        record = json.loads(path.read_text())
        status = {e["stage"]: e["status"] for e in record["stages"]}
        assert status == {"train": "skipped", "evaluate": "done", "promote": "done",
                          "deploy": "done", "smoke": "done"}, text[-3000:]
        rows = [{"age": 39, "workclass": "State-gov", "fnlwgt": 77516, "education": "Bachelors",
                 "education_num": 13, "marital_status": "Never-married",
                 "occupation": "Adm-clerical", "relationship": "Not-in-family", "race": "White",
                 "sex": "Male", "capital_gain": 2174, "capital_loss": 0, "hours_per_week": 40,
                 "native_country": "United-States"}]
        r = requests.post(f"http://127.0.0.1:{port}/predict", json={"records": rows}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        # a second terminal: jobs.monitor joins that Ray (token auth from ~/.ray, as a user has)
        address = next(ln.split()[1] for ln in text.splitlines() if ln.startswith("ray  "))
        mon = subprocess.run([sys.executable, "-m", "jobs.monitor", "+experiment=adult_mlp",
                              f"ray.address={address}", f"storage.uri={tmp_path / 'out'}",
                              "monitor.new_data=unused.parquet", "monitor.once=true",
                              "tracking=none"], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=job_env(RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None))
        assert mon.returncode == 0, mon.stdout[-2000:] + mon.stderr[-3000:]
        assert "adult_mlp:1: no drift past the thresholds" in mon.stdout
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
    text = log.read_text()
    assert "stopped" in text.splitlines()[-3:] or "stopped" in text[-500:], text[-2000:]
    record = json.loads(next((tmp_path / "out" / "runs").glob("adult_mlp-*/pipeline.json"))
                        .read_text())
    assert record["serving"]["version"] == "adult_mlp:1"
