"""docs/own-dataset.md, run as a new user would: its commands in order, in an empty folder, each
`python -m jobs.*` its own process (starting its own local Ray), with fewer epochs, folds and
bootstrap resamples appended. German Credit as a CSV by config alone: trained, judged by the
baseline gates, registered under the run's name, served with its judged rule."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port, job_env, wait_until

pytestmark = pytest.mark.slow

# 1,000 rows train in seconds: only the bootstrap counts are cut (and W&B files skipped)
FAST = {"jobs.train": ["tracking=none"],
        "jobs.evaluate": ["cv.folds=3", "n_boot=100", "fairness.n_boot=100"],
        "jobs.promote": ["cv.folds=3", "n_boot=100", "fairness.n_boot=100"]}


def walkthrough() -> list[str]:
    cmds, block, fenced = [], [], False
    for line in (REPO / "docs" / "own-dataset.md").read_text().splitlines():
        if line.startswith("```"):
            if fenced:
                cmds += [c.strip() for c in "\n".join(block).replace("\\\n", " ").splitlines()
                         if c.strip()]
            fenced, block = not fenced, []
        elif fenced:
            block.append(line)
    return cmds


def test_the_own_dataset_walkthrough_runs(tmp_path):
    cmds = walkthrough()
    assert [c.split()[2] if c.startswith("python -m") else "python -c" for c in cmds] == [
        "python -c", "jobs.train", "jobs.evaluate", "jobs.promote", "jobs.serve"]
    env = job_env(MLOPS_RAY_STEP_GATE=None, RAY_ADDRESS=None)
    # an own Ray per job, as a new user's: not the test session's cluster
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_MODE", None)
    run_dir = None

    def argv(cmd: str) -> list[str]:
        words = shlex.split(cmd.replace("outputs/runs/<run>", str(run_dir or "")))
        return [sys.executable, *words[1:], *FAST.get(words[2], [])]
    for cmd in cmds[:4]:
        out = subprocess.run(argv(cmd), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        if "jobs.train" in cmd:
            epochs = [x for x in out.stdout.splitlines() if "[mlops_ray] epoch" in x]
            assert len(epochs) >= 5, out.stdout  # one line per epoch (early stopping may end it)
            (run_dir,) = (tmp_path / "outputs" / "runs").glob("credit-*")
        if "jobs.evaluate" in cmd:
            assert "baseline, logistic regression on the same folds" in out.stdout
            assert "vs_baseline" in out.stdout and "verdict: PASS" in out.stdout
    report = json.loads((run_dir / "eval" / "gate_report.json").read_text())
    assert {g["name"] for g in report["gates"]} == {
        "vs_baseline", "cv_stable", "calibrated", "eo_sex", "eo_age_group"}
    assert report["passed"] and report["rule"]["postprocessor"]["attribute"] == "sex"
    # the model is the run's name; served with the rule the gates judged, at the URL it prints
    port = free_port()
    serve = argv(cmds[4]) + [f"serve.port={port}"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(serve, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def printed():
            found = re.search(r"^endpoint +(http://\S+/predict)", (tmp_path / "serve.log")
                              .read_text(), re.M)
            return found.group(1) if found else None
        url = wait_until(lambda: printed() or proc.poll() is not None, 300,
                         what="jobs.serve printing its endpoint")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        import pandas as pd
        row = pd.read_csv(tmp_path / "german.csv").head(1)
        body = {"records": json.loads(row.to_json(orient="records"))}
        r = requests.post(url, json=body, timeout=30)  # a whole row of the file: named, refused
        assert r.status_code == 422 and "unknown field(s) ['good_credit', 'personal_status_sex']" \
            in r.json()["error"], r.text
        body = {"records": json.loads(row.drop(columns=["good_credit", "personal_status_sex"])
                                      .to_json(orient="records"))}
        r = requests.post(url, json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "credit" and r.json()["version"] == 1
        no_sex = {"records": [{k: v for k, v in body["records"][0].items() if k != "sex"}]}
        assert requests.post(url, json=no_sex, timeout=10).status_code == 422
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, Path(tmp_path / "serve.log").read_text()[-3000:]
