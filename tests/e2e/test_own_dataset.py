"""docs/own-dataset.md, run as a new user would: its commands in order, in an empty folder, each
`python -m jobs.*` its own process (the first starts the checkout's warm Ray, the others attach
to it), with fewer epochs, folds and bootstrap resamples appended. German Credit as a CSV by
config alone: trained, judged by the baseline gates, registered under the run's name, served
with its judged rule; `make stop` ends it."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import requests

from tests.conftest import REPO, free_port, job_env

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


def test_the_own_dataset_walkthrough_runs(tmp_path, warm_ray):
    cmds = walkthrough()
    assert [c.split()[2] if c.startswith("python -m") else "python -c" for c in cmds] == [
        "python -c", "jobs.train", "jobs.evaluate", "jobs.promote", "jobs.serve"]
    env = job_env(MLOPS_RAY_STEP_GATE=None, RAY_ADDRESS=None)
    # the warm Ray of the test's own folder, as a new user's: not the test session's cluster
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
    serve = subprocess.run(argv(cmds[4]) + [f"serve.port={port}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert serve.returncode == 0, serve.stdout[-3000:] + serve.stderr[-3000:]
    # it deployed onto the warm Ray and returned: the app stays until `make stop`
    url = re.search(r"^endpoint +(http://\S+/predict)", serve.stdout, re.M).group(1)
    assert "the app stays on this checkout's warm Ray" in serve.stdout
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
    # `make stop`: the warm Ray and the app on it end
    stop = subprocess.run([sys.executable, "-m", "mlops_ray.warm", "stop"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and "stopped the warm Ray" in stop.stdout, stop.stderr
    with pytest.raises(requests.ConnectionError):
        requests.post(url, json=body, timeout=10)
