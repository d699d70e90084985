"""jobs.pipeline and jobs.monitor on the shared local cluster: the whole way from data to a
served model; a rerun skips every finished stage; a weak candidate is stopped by the gates
before promotion (the job exits 5); shifted traffic with late labels replayed against the
endpoint makes the monitor retrain from the prediction log, and the gates' decision is
audited; `tune.enabled=true`.

The pipeline runs in this process with the CI profile (every stage real, on less) and the tests
read its record (pipeline.json); the refused candidate's exit code is the one jobs.pipeline ends
with (tests/e2e run the entry point itself)."""
from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
import pytest
import requests

from mlops_ray.config.compose import job
from mlops_ray.config.pipeline import MonitorJob, PipelineJob
from mlops_ray.data import load_table
from mlops_ray.registry import open_registry
from tests.conftest import PROFILE, free_port, in_process, wait_until

pytestmark = pytest.mark.ray


ROW = {"age": 39, "workclass": "State-gov", "fnlwgt": 77516, "education": "Bachelors",
       "education_num": 13, "marital_status": "Never-married", "occupation": "Adm-clerical",
       "relationship": "Not-in-family", "race": "White", "sex": "Male", "capital_gain": 2174,
       "capital_loss": 0, "hours_per_week": 40, "native_country": "United-States"}


def pipeline_job(common: list[str], *extra: str) -> PipelineJob:
    return job("pipeline", PipelineJob, [*common, *extra])


@pytest.fixture(scope="module")
def deployed(ray_2_cpus, tmp_path_factory):
    from ray import serve

    from mlops_ray.pipeline.run import run_pipeline
    store = tmp_path_factory.mktemp("pipeline")
    port = free_port()
    common = [*PROFILE, f"storage.uri={store}", f"ray.address={ray_2_cpus}",
              f"serve.port={port}",
              # the prediction log keeps sensitive attributes: live fairness and retraining
              "serve.prediction_log.log_sensitive=true"]
    logs: list[str] = []
    try:  # a pipeline that fails after deploy must not leave its replicas holding the CPUs
        first = run_pipeline(pipeline_job(common), log=logs.append)
        yield {"store": store, "common": common, "url": f"http://127.0.0.1:{port}",
               "first": first, "logs": logs, "reg": open_registry(pipeline_job(common))}
    finally:
        serve.shutdown()  # the app outlived the stages (ray.address was given): remove it


def record(run_uri: str) -> dict:
    from pathlib import Path
    return json.loads((Path(run_uri.removeprefix("file://")) / "pipeline.json").read_text())


def statuses(rec: dict) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in rec["stages"]}


def test_pipeline_serves_the_gated_model_and_a_rerun_skips_finished_stages(deployed):
    from mlops_ray.pipeline.run import run_pipeline
    first = record(deployed["first"]["run"])
    assert statuses(first) == dict.fromkeys(("train", "evaluate", "promote", "deploy", "smoke"),
                                            "done")
    assert first["version"] == 1 and first["serving"]["version"] == "adult_mlp:1"
    assert first["serving"]["endpoint"] == deployed["url"]
    assert first["smoke"]["rows"] == 50 and first["smoke"]["max_abs_diff"] <= 1e-5
    assert deployed["first"]["report"]["passed"]  # the verdict the stages acted on
    assert any("verdict: PASS" in line for line in deployed["logs"])
    # CV folds started beside the training run (if the cluster had room) were the very folds
    # evaluate trains: taken over, never dropped as another run's
    assert not any("not these folds" in line for line in deployed["logs"]), deployed["logs"]
    # the app stays on the cluster after the stages: it answers from production
    rows = load_table("builtin://adult").drop(columns=["income", "uci_split"]).head(3)
    r = requests.post(deployed["url"] + "/predict", timeout=30,
                      json={"records": json.loads(rows.to_json(orient="records"))})
    assert r.status_code == 200 and r.json()["version"] == 1 and len(r.json()["labels"]) == 3

    again = run_pipeline(pipeline_job(deployed["common"]), log=lambda _: None)
    rec = record(again["run"])
    assert statuses(rec) == {"train": "skipped", "evaluate": "skipped", "promote": "skipped",
                             "deploy": "skipped", "smoke": "done"}
    notes = {s["stage"]: s["note"] for s in rec["stages"]}
    assert notes["evaluate"] == "adult_mlp:1 is production already"
    actions = [h["action"] for h in deployed["reg"].audit_log("adult_mlp")]
    assert actions.count("register") == 1 and actions.count("deploy") == 1


def test_another_registrys_version_of_the_same_number_does_not_pass_for_the_served_one(
        deployed, tmp_path, capsys):
    """Another storage.uri (another registry) whose production is also adult_mlp:1, but
    another artifact: its deploy onto the app serving the first registry's adult_mlp:1 is
    refused (exit 10) naming both contents, instead of being skipped as already served, and
    the app still answers with the first registry's version."""
    from mlops_ray.pipeline.run import run_pipeline
    other = [c for c in deployed["common"] if not c.startswith("storage.uri=")]
    before = requests.post(deployed["url"] + "/predict", json={"records": [ROW]}, timeout=30)
    code = in_process("pipeline", PipelineJob, [
        *other, f"storage.uri={tmp_path}", "stages=[train,evaluate,promote,deploy]"],
        run_pipeline)
    out, err = capsys.readouterr()
    assert code == 10, out[-3000:] + err[-3000:]
    assert "serves adult_mlp:1 with content" in err and "from another registry" in err
    (path,) = tmp_path.glob("runs/adult_mlp-*/pipeline.json")
    assert statuses(json.loads(path.read_text()))["deploy"] == "failed"
    after = requests.post(deployed["url"] + "/predict", json={"records": [ROW]}, timeout=30)
    assert after.status_code == 200 and before.status_code == 200
    assert after.json()["probabilities"] == before.json()["probabilities"]


def test_served_answers_are_the_judged_rule_mitigation_included(deployed):
    """The default evaluation mitigates with Fairlearn's ThresholdOptimizer: the version's
    decision rule is that post-processor, the gates judged its labels, and Serve answers
    held-out rows with exactly those labels and the run's probabilities."""
    import numpy as np

    from mlops_ray.artifacts import rule as R
    from mlops_ray.artifacts.runs import load_run_model, resolve_run
    from mlops_ray.data import prepare
    from tests.conftest import dataset
    report = deployed["first"]["report"]
    decision = report["rule"]
    assert decision["postprocessor"]["attribute"] == "sex"
    v, folder = deployed["reg"].fetch("adult_mlp:1")
    assert json.loads((folder / "rule.json").read_text()) == decision
    assert report["rule_sha256"] == R.digest(decision)
    prepared = prepare(dataset("adult_mlp"), 0)
    test = prepared.frame.iloc[prepared.splits["test"]]
    run_rec, _ = resolve_run(deployed["first"]["run"], {})
    p = load_run_model(run_rec, {})(test)
    y = R.labels(decision, p, test["sex"].tolist())
    # the gates judged these labels: the report's "after" accuracy is theirs
    y_true = prepared.labels(test).astype(int)
    assert report["mitigation"]["after"]["accuracy"] == float((y == y_true).mean())
    sig = json.loads((folder / "signature.json").read_text())
    cols = [f["name"] for f in sig["inputs"]]
    sample = test.iloc[:600]
    records = json.loads(sample[cols].to_json(orient="records"))
    got_p, got_y = [], []
    for i in range(0, len(records), 200):
        r = requests.post(deployed["url"] + "/predict", json={"records": records[i:i + 200]},
                          timeout=60)
        assert r.status_code == 200, r.text
        got_p += r.json()["probabilities"]
        got_y += r.json()["labels"]
    np.testing.assert_allclose(got_p, p[:600], atol=1e-6)
    assert got_y == y[:600].tolist()
    # the rule needs the attribute: a request without it, or with a group it does not know, is
    # a 422 naming it
    no_sex = {k: v for k, v in records[0].items() if k != "sex"}
    r = requests.post(deployed["url"] + "/predict", json={"records": [no_sex]}, timeout=30)
    assert r.status_code == 422 and "records[0].sex: required field is missing" in r.text
    r = requests.post(deployed["url"] + "/predict", timeout=30,
                      json={"records": [{**records[0], "sex": "Other"}]})
    assert r.status_code == 422 and "sex='Other': unknown category" in r.text


def test_a_failed_gate_stops_the_pipeline_before_promotion(deployed, capsys):
    from mlops_ray.pipeline.run import run_pipeline
    code = in_process("pipeline", PipelineJob, [
        *deployed["common"], "name=adult_weak", "promote.model=adult_mlp", "train.epochs=1",
        "optim.lr=0.00003", "model.hidden=[8]"], run_pipeline)
    out, err = capsys.readouterr()
    assert code == 5, out[-3000:] + err[-3000:]  # the exit code jobs.pipeline ends with
    assert "verdict: FAIL" in out
    assert "gate(s) failed" in err and "stopped before promotion" in err
    (path,) = deployed["store"].glob("runs/adult_weak-*/pipeline.json")
    rec = json.loads(path.read_text())
    assert statuses(rec) == {"train": "done", "evaluate": "failed"}
    reg = deployed["reg"]
    assert reg.aliases("adult_mlp")["production"] == 1
    refused = [h for h in reg.audit_log("adult_mlp") if h["action"] == "pipeline_refused"]
    assert refused and refused[-1]["verdict"] == "failed" and "cv_auc" in refused[-1]["reason"]
    r = requests.post(deployed["url"] + "/predict", json={"records": [{}]}, timeout=30)
    assert r.status_code == 422  # still served, still validating


def test_shifted_traffic_with_late_labels_retrains_from_the_log(deployed):
    """Serve -> shifted traffic (older, longer hours, and far more positives than in training)
    -> its labels come back later through /feedback -> the monitor sees the drift and a gate
    that would fail on the labelled traffic (calibration) -> it assembles the retraining data
    from the prediction log (no file named) -> the pipeline's gates and canary -> production
    moves. Each step is in the audit chain; the new version's lineage names the log parts."""
    from pathlib import Path

    from mlops_ray.data import traffic
    from mlops_ray.pipeline.monitor import monitor
    from mlops_ray.storage import resolve
    df = load_table("builtin://adult")
    df["age"] = (df["age"] + 20).clip(upper=95)
    df["hours_per_week"] = (df["hours_per_week"] + 15).clip(upper=99)
    pos = df[df["income"] == 1].sample(480, random_state=1)
    shifted = pd.concat([pos, df[df["income"] == 0].sample(320, random_state=1)]).sample(
        frac=1, random_state=2)  # 60% positive; the model learnt about 24%
    url, reg = deployed["url"], deployed["reg"]
    prod = reg.aliases("adult_mlp")["production"]
    before = requests.get(url + "/admin/drift", timeout=30).json()
    assert not any(r.get("alert") for r in before[f"adult_mlp:{prod}"])
    records = json.loads(shifted.drop(columns=["income", "uci_split"]).to_json(orient="records"))
    outcomes = shifted["income"].astype(int).tolist()
    answered = []
    for i in range(0, len(records), 50):
        r = requests.post(url + "/predict", json={"records": records[i:i + 50]}, timeout=30)
        assert r.status_code == 200, r.text
        answered.append((r.json()["request_id"], outcomes[i:i + 50]))
    for rid, labels in answered:  # the outcomes come back later
        fb = requests.post(url + "/feedback", json={"request_id": rid, "labels": labels},
                           timeout=30)
        assert fb.status_code == 200, fb.text
    log_store = resolve(str(deployed["store"] / "prediction_log"))

    def labelled_rows() -> int:
        preds, _ = traffic.read(log_store, traffic.PREDICTIONS, "adult_mlp")
        labs, _ = traffic.read(log_store, traffic.LABELS, "adult_mlp")
        return len(traffic.labelled(preds[preds["request_id"].isin([a for a, _ in answered])],
                                    labs, traffic.now()))
    wait_until(lambda: labelled_rows() == 800, 60, what="the 800 answers and labels in the log")

    def alerts():
        return {r["feature"] for r in requests.get(url + "/admin/drift", timeout=30)
                .json()[f"adult_mlp:{prod}"] if r.get("alert")}
    wait_until(lambda: "age" in alerts(), 60, what="an age drift alert")
    from tests.integration.test_serve import Webhook
    hook = Webhook()
    logs: list[str] = []
    try:
        code = monitor(job("monitor", MonitorJob, [*deployed["common"], "monitor.once=true",
                                                   "monitor.original_ratio=100",
                                                   f"serve.drift.webhook_url={hook.url}"]),
                       log=logs.append)
    finally:
        hook.server.shutdown()
    text = "\n".join(logs)
    (alert,) = [a for a in hook.received if a["alert"] == "live_gate"]  # the alert, once
    assert alert["version"] == f"adult_mlp:{prod}" and alert["rows"] >= 800
    assert "calibrated" in [g["name"] for g in alert["failed"]]
    assert code == 0, text[-4000:]
    assert "drift in age" in text and "live gate calibrated would fail" in text, text[-4000:]
    assert "retraining on the prediction log" in text
    audit = reg.audit_log("adult_mlp")
    trig = [h for h in audit if h["action"] == "retrain_triggered"][-1]
    done = [h for h in audit if h["action"] == "retrain_finished"][-1]
    details = json.loads(trig["details"])
    assert trig["version"] == prod and "live gate calibrated" in trig["reason"]
    assert details["sources"]["rows"]["traffic"] >= 800
    assert details["live_gates"]["rows"] >= 800
    assert done["verdict"] == "promoted"
    new = reg.aliases("adult_mlp")["production"]
    assert new != prod
    moved = [h for h in audit if h["action"] == "alias" and h["alias"] == "production"]
    assert "jobs.monitor: drift in age" in moved[-1]["reason"]
    assert any(h["action"] == "traffic" and "canary" in (h["details"] or "") for h in audit)
    answer = requests.post(url + "/predict", json={"records": records[:2]}, timeout=30)
    assert answer.json()["version"] == new
    # lineage: the version names the log parts (and label parts) it learnt from
    _, folder = reg.fetch(f"adult_mlp:{new}")
    lineage = json.loads((Path(folder) / "lineage.json").read_text())["data_sources"]
    cut = datetime.fromisoformat(lineage["cutoff"])
    parts = lineage["prediction_parts"]
    assert set(parts) <= set(traffic.parts(log_store, traffic.PREDICTIONS, "adult_mlp", cut))
    import pyarrow.parquet as pq
    ids = set().union(*(pq.read_table(log_store.path(p), columns=["request_id"])
                        .column(0).to_pylist() for p in parts))
    assert {a for a, _ in answered} <= ids  # every answer it learnt from is in a named part
    assert lineage["label_parts"] and lineage["log"] == log_store.uri
    assert lineage["rows"]["traffic"] >= 800 and lineage["table"].endswith(".parquet")


def test_tune_enabled_tunes_then_evaluates_the_best_trial(deployed):
    """Two trials at once, each a Ray Train run on two workers (2 x 2 x 0.45 CPU), then the
    best one evaluated. On the metric alone: both 2-epoch trials sit within 0.002 of the eo_sex
    gate, so which one the gate-aware estimate prefers is a coin flip (its selection has its
    own known-case test, tests/integration/test_tune.py)."""
    from mlops_ray.pipeline.run import run_pipeline
    out = run_pipeline(pipeline_job(deployed["common"], "tune.enabled=true",
                                    "tune.gate_aware=false",
                                    "tune.max_concurrent_trials=2", "scaling.num_workers=2",
                                    "scaling.resources_per_worker.CPU=0.45",
                                    "promote.model=adult_tuned", "stages=[train,evaluate]"),
                       log=lambda _: None)
    assert statuses(out) == {"tune": "done", "evaluate": "done"} and out["report"]["passed"]
    (summary,) = (deployed["store"] / "tune").glob("adult_mlp-tune-*/tune.json")
    tuned = json.loads(summary.read_text())
    assert len(tuned["trials"]) == 2 and tuned["trial_backend"] == "train"
    study = summary.parent
    assert len(list((study / "trials").glob("trial-*"))) == 2  # each trial a Train run
    assert tuned["best"]["checkpoint"].startswith(f"file://{study}/trials/")
    (report,) = deployed["store"].glob("runs/adult_mlp-tune-*-best/eval/gate_report.json")
    assert json.loads(report.read_text())["lineage"]["run"] == tuned["best"]["run_uri"]


def test_racing_model_families_promotes_the_best_that_passes_its_gates(ray_2_cpus, tmp_path):
    """candidates=[mlp,xgboost]: both are trained and judged by the same gates on the same
    data, each as its own run with its own gate report; the one with the best CV AUC among
    those that pass is the version promoted, and the record shows every candidate."""
    from mlops_ray.pipeline.race import race_table
    from mlops_ray.pipeline.run import run_pipeline
    common = [*PROFILE, f"storage.uri={tmp_path}", f"ray.address={ray_2_cpus}",
              "candidates=[mlp,xgboost]", "stages=[train,evaluate,promote]"]
    logs: list[str] = []
    out = run_pipeline(pipeline_job(common), log=logs.append)
    table = out["candidates"]
    assert [r["candidate"] for r in table] == ["mlp", "xgboost"]
    assert len({r["run"] for r in table}) == 2 and all(r["report"] for r in table)
    assert [s["stage"] for s in out["stages"]] == [
        "train[mlp]", "evaluate[mlp]", "train[xgboost]", "evaluate[xgboost]", "promote"]
    passed = [r for r in table if r["passed"]]
    assert passed, race_table(table)
    win = max(passed, key=lambda r: r["cv/auc_mean"])
    assert [r["selected"] for r in table] == [r is win for r in table]
    assert out["run"] == win["run"]
    reg = open_registry(pipeline_job(common))
    assert reg.get("adult_mlp@production").run_uri == win["run"]
    runs = {r["candidate"]: json.loads((tmp_path / "runs" / r["run"].rsplit("/", 1)[-1]
                                        / "run.json").read_text()) for r in table}
    assert runs["xgboost"]["config"]["model"]["library"] == "xgboost"
    assert "hidden" in runs["mlp"]["config"]["model"]
    assert race_table(table) in "\n".join(logs)
