"""jobs.pipeline and jobs.monitor as a user runs them, on the shared local cluster: the whole
way from data to a served model in one command; a rerun skips every finished stage; a weak
candidate is stopped by the gates before promotion; a shifted feature replayed against the
endpoint makes jobs.monitor retrain on the new data, and the gates' decision is audited."""
from __future__ import annotations

import json

import pytest
import requests

from mlops_ray.data import load_table
from tests.conftest import free_port, run_job, wait_until

pytestmark = pytest.mark.ray
QUICK = ["train.epochs=2", "cv.folds=2", "cv.epochs=1", "n_boot=50", "fairness.n_boot=50",
         "tracking=none"]


@pytest.fixture(scope="module")
def deployed(ray_2_cpus, tmp_path_factory):
    from ray import serve
    store = tmp_path_factory.mktemp("pipeline")
    port = free_port()
    common = ["+experiment=adult_mlp", f"storage.uri={store}", f"ray.address={ray_2_cpus}",
              f"serve.port={port}", "serve.drift.check_interval_s=1", "serve.drift.min_rows=150",
              "serve.rollout.bake_s=3", "serve.rollout.poll_s=0.2",
              "serve.rollout.min_requests=10", *QUICK]
    first = run_job(["jobs.pipeline", *common], timeout=900)
    try:
        yield {"store": store, "common": common, "url": f"http://127.0.0.1:{port}",
               "first": first}
    finally:
        serve.shutdown()  # the app outlived the jobs (ray.address was given): remove it


def history(store) -> list[dict]:
    out = run_job(["jobs.registry", "--json", "history", "adult_mlp", f"storage.uri={store}"],
                  timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def production(store) -> int:
    out = run_job(["jobs.registry", "--json", "show", "adult_mlp", f"storage.uri={store}"],
                  timeout=60)
    return json.loads(out.stdout)["aliases"]["production"]


def stage_status(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ("train", "tune", "evaluate", "promote",
                                                          "deploy", "smoke")
            and len(line.split()) > 2 and line.split()[1] in ("done", "skipped", "failed")}


def test_pipeline_serves_the_gated_model_and_a_rerun_skips_finished_stages(deployed):
    first = deployed["first"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert stage_status(first.stdout) == dict.fromkeys(
        ("train", "evaluate", "promote", "deploy", "smoke"), "done")
    assert "verdict: PASS" in first.stdout and "adult_mlp@production: None -> 1" in first.stdout
    assert "model card file://" in first.stdout and "/eval/model_card.md" in first.stdout
    assert f"endpoint   {deployed['url']}/predict" in first.stdout
    # the app stays on the cluster after the job: it answers from production
    rows = load_table("builtin://adult").drop(columns=["income", "uci_split"]).head(3)
    r = requests.post(deployed["url"] + "/predict", timeout=30,
                      json={"records": json.loads(rows.to_json(orient="records"))})
    assert r.status_code == 200 and r.json()["version"] == 1 and len(r.json()["labels"]) == 3
    record = json.loads(next((deployed["store"] / "runs").glob("adult_mlp-*/pipeline.json"))
                        .read_text())
    assert [s["stage"] for s in record["stages"]] == ["train", "evaluate", "promote", "deploy",
                                                       "smoke"]
    assert record["smoke"]["rows"] == 200 and record["smoke"]["max_abs_diff"] <= 1e-5

    again = run_job(["jobs.pipeline", *deployed["common"]], timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert stage_status(again.stdout) == {"train": "skipped", "evaluate": "skipped",
                                          "promote": "skipped", "deploy": "skipped",
                                          "smoke": "done"}, again.stdout[-3000:]
    assert "adult_mlp:1 is production already" in again.stdout
    actions = [h["action"] for h in history(deployed["store"])]
    assert actions.count("register") == 1 and actions.count("deploy") == 1


def test_a_failed_gate_stops_the_pipeline_before_promotion(deployed):
    weak = run_job(["jobs.pipeline", *deployed["common"], "name=adult_weak",
                    "promote.model=adult_mlp", "train.epochs=1", "optim.lr=0.00003",
                    "model.hidden=[8]"], timeout=900)
    assert weak.returncode == 5, weak.stdout[-3000:] + weak.stderr[-3000:]
    assert "FAIL" in weak.stdout and "verdict: FAIL" in weak.stdout
    assert "gate(s) failed" in weak.stderr and "stopped before promotion" in weak.stderr
    assert stage_status(weak.stdout) == {"train": "done", "evaluate": "failed"}
    assert production(deployed["store"]) == 1
    refused = [h for h in history(deployed["store"]) if h["action"] == "pipeline_refused"]
    assert refused and refused[-1]["verdict"] == "failed" and "cv_auc" in refused[-1]["reason"]
    r = requests.post(deployed["url"] + "/predict", json={"records": [{}]}, timeout=30)
    assert r.status_code == 422  # still served, still validating


def test_drift_on_the_endpoint_triggers_retraining_through_the_gates(deployed, tmp_path):
    df = load_table("builtin://adult")
    df["age"] = (df["age"] + 20).clip(upper=95)
    df["hours_per_week"] = (df["hours_per_week"] + 15).clip(upper=99)
    new_data = tmp_path / "adult_shifted.parquet"
    df.to_parquet(new_data)
    url = deployed["url"]
    before = requests.get(url + "/admin/drift", timeout=30).json()
    assert not any(r.get("alert") for r in before["adult_mlp:1"])
    # live traffic with the shift, until the ingress's drift check flags it
    records = json.loads(df.drop(columns=["income", "uci_split"]).sample(400, random_state=0)
                         .to_json(orient="records"))
    for i in range(0, len(records), 50):
        assert requests.post(url + "/predict", json={"records": records[i:i + 50]},
                             timeout=30).status_code == 200

    def alerts():
        return {r["feature"] for r in requests.get(url + "/admin/drift", timeout=30)
                .json()["adult_mlp:1"] if r.get("alert")}
    wait_until(lambda: "age" in alerts(), 60, what="an age drift alert")
    mon = run_job(["jobs.monitor", *deployed["common"], f"monitor.new_data={new_data}",
                   "monitor.once=true"], timeout=900)
    # 0: promoted, 5: refused by the gates; not 10: a model retrained for drift answers the
    # drifted traffic differently, which must not roll its canary back (canary_max_prediction_shift)
    assert mon.returncode in (0, 5), mon.stdout[-4000:] + mon.stderr[-3000:]
    assert "drift in age" in mon.stdout and "retraining on" in mon.stdout
    audit = history(deployed["store"])
    trig = [h for h in audit if h["action"] == "retrain_triggered"]
    done = [h for h in audit if h["action"] == "retrain_finished"]
    assert trig and "drift in age" in trig[-1]["reason"] and trig[-1]["version"] == 1
    assert json.loads(trig[-1]["details"])["new_data"] == str(new_data)
    if mon.returncode == 0:  # better than the champion on the new data: promoted by canary
        assert done[-1]["verdict"] == "promoted"
        assert production(deployed["store"]) == 2
        moved = [h for h in audit if h["action"] == "alias" and h["alias"] == "production"]
        assert "jobs.monitor: drift in age" in moved[-1]["reason"]
        assert any(h["action"] == "traffic" and "canary" in (h["details"] or "")
                   for h in audit)
        answer = requests.post(url + "/predict", json={"records": records[:2]}, timeout=30)
        assert answer.json()["version"] == 2
    else:  # refused: production and traffic unchanged, the failed gates on record
        assert done[-1]["verdict"] == "refused" and json.loads(done[-1]["details"])[
            "failed_gates"]
        assert production(deployed["store"]) == 1


def test_tune_true_tunes_then_evaluates_the_best_trial(deployed):
    tuned = run_job(["jobs.pipeline", *deployed["common"], "tune=true", "tune.num_samples=2",
                     "scheduler=fifo", "promote.model=adult_tuned", "stages=[train,evaluate]"],
                    timeout=900)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    assert "== [1/2] tune" in tuned.stdout and "verdict: PASS" in tuned.stdout
    assert stage_status(tuned.stdout) == {"tune": "done", "evaluate": "done"}
    (summary,) = (deployed["store"] / "tune").glob("adult_mlp-tune-*/tune.json")
    best = json.loads(summary.read_text())["best"]
    assert len(json.loads(summary.read_text())["trials"]) == 2
    (report,) = deployed["store"].glob("runs/adult_mlp-tune-*-best/eval/gate_report.json")
    assert json.loads(report.read_text())["lineage"]["run"] == best["run_uri"]
