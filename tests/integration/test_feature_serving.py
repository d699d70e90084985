"""A feature-store dataset end to end on the shared local cluster: `dataset=adult_people`
(Feast, point-in-time join) trained, judged by the gates, registered and served; requests carry
only `person_id` and the ingress reads the online store. The smoke stage is a skew check over
HTTP (served == the registered rule on the offline join at the same time), and the test checks
the vectors themselves: online and offline, through the same preprocessing, are equal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from mlops_ray.config.compose import job
from mlops_ray.config.pipeline import PipelineJob
from tests.conftest import free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def served(ray_2_cpus, tmp_path_factory):
    from ray import serve

    from mlops_ray.pipeline.run import run_pipeline
    store = tmp_path_factory.mktemp("features")
    port = free_port()
    pj = job("pipeline", PipelineJob, ["+experiment=adult_people_mlp", "+profile=ci",
                                       f"storage.uri={store}", f"ray.address={ray_2_cpus}",
                                       f"serve.port={port}"])
    logs: list[str] = []
    try:  # a pipeline that fails after deploy must not leave its replicas holding the CPUs
        out = run_pipeline(pj, log=logs.append)
        yield {"job": pj, "out": out, "url": f"http://127.0.0.1:{port}", "logs": logs}
    finally:
        serve.shutdown()


def test_feast_dataset_trains_gates_and_serves_entity_only_requests(served):
    rec = json.loads((Path(served["out"]["run"].removeprefix("file://")) / "pipeline.json")
                     .read_text())
    assert {s["stage"]: s["status"] for s in rec["stages"]} == dict.fromkeys(
        ("train", "evaluate", "promote", "deploy", "smoke"), "done")
    assert served["out"]["report"]["passed"]
    # smoke: 50 held-out people by key, answered from the online store == offline join, now
    assert rec["smoke"]["rows"] == 50 and rec["smoke"]["max_abs_diff"] == 0
    from mlops_ray.registry import open_registry
    _, folder = open_registry(served["job"]).fetch("adult_people_mlp@production")
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["feature_store"]["views"] == ["person_profile", "person_work",
                                                 "person_finance"]
    sig = json.loads((folder / "signature.json").read_text())
    assert sig["entity"]["join_key"] == "person_id"
    url = served["url"] + "/predict"
    r = requests.post(url, json={"records": [{"person_id": 5}, {"person_id": 7}]}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["probabilities"]) == 2
    r = requests.post(url, json={"records": [{"person_id": 5}, {"person_id": 10**9}]},
                      timeout=30)
    assert r.status_code == 404 and "records[1].person_id=1000000000: unknown entity" in r.text
    r = requests.post(url, json={"records": [{"person_id": 5, "age": 30}]}, timeout=30)
    assert r.status_code == 422 and "send only 'person_id'" in r.text
    # the Open Inference Protocol takes every feature as tensors, as for any model: a person's
    # online values give /predict's answer for that person
    from mlops_ray.features.online import OnlineLookup
    rows = OnlineLookup(sig["entity"]).lookup(list(range(50)))
    key, feats = next((k, r) for k, r in enumerate(rows) if None not in r.values())
    inputs = [{"name": k, "shape": [1], "data": [v],
               "datatype": "BYTES" if isinstance(v, str) else "FP64"} for k, v in feats.items()]
    r = requests.post(served["url"] + "/v2/models/adult_people_mlp/infer",
                      json={"inputs": inputs}, timeout=30)
    assert r.status_code == 200, r.text
    (prob,) = [o for o in r.json()["outputs"] if o["name"] == "probability"]
    by_key = requests.post(url, json={"records": [{"person_id": key}]}, timeout=30).json()
    assert prob["data"] == by_key["probabilities"]


def test_online_and_offline_vectors_are_equal(served):
    """The skew test: for the same people at the same time, the online store's features and
    the point-in-time join's, through the registered preprocessing, give the same matrix.
    Among them people whose latest values came after their label (the online store has
    those, and so has the join *now*)."""
    from mlops_ray.artifacts.predictor import Predictor
    from mlops_ray.data.featurestore import FeatureRepo
    from mlops_ray.features.online import OnlineLookup
    from mlops_ray.registry import open_registry
    from mlops_ray.serving.schema import validate_records
    pj = served["job"]
    ref, folder = open_registry(pj).fetch("adult_people_mlp@production")
    sig = json.loads((folder / "signature.json").read_text())
    work = pd.read_parquet(Path(sig["entity"]["store"]) / "sources" / "person_work"
                           / "base.parquet")
    keys = sorted(set(work["person_id"].head(400).tolist()))[:150]
    online = validate_records(OnlineLookup(sig["entity"]).lookup(keys), sig, 1000)
    now = pd.DataFrame({"person_id": keys, "event_timestamp": pd.Timestamp.now(tz="UTC")})
    offline = FeatureRepo(pj.dataset.feast, pj.storage.uri).training_frame(now)
    pre = Predictor.load(folder, ref.ref).pre
    a = pre.transform_records(online)  # serving's path; training's is transform()
    b = pre.transform(offline)
    assert a.shape == (len(keys), pre.n_features)
    np.testing.assert_array_equal(a, b)
    # the latest values, not those at the label: some differ from the training rows
    trained = FeatureRepo(pj.dataset.feast, pj.storage.uri).training_frame(
        pd.read_parquet(Path(__file__).resolve().parents[2] / "mlops_ray" / "data" / "builtin"
                        / "adult_people.parquet").set_index("person_id").loc[keys]
        .reset_index()[["person_id", "event_timestamp"]])
    assert (pre.transform(trained) != b).any(axis=1).sum() > 10
