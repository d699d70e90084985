"""Node loss and spot preemption on a real multi-node Ray cluster on this machine.

Head + 2 spot worker nodes (`ray.cluster_utils.Cluster`, one raylet each). The driver runs in a
thread of this process, on the head; the main thread kills and replaces worker nodes. This tier
needs its own process (`make test-multinode`; `make test` runs it after the others): the other
tiers share one single-node Ray that is already up in theirs.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from mlops_ray.cluster.rehearsal import (
    Background,
    FakeMetadata,
    LocalCluster,
    checkpoints,
    read_step_log,
    wait_for,
)
from mlops_ray.config import compose, validate
from mlops_ray.config.schema import TrainJobCfg, TuneJobCfg
from mlops_ray.train.trainer import run_training

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def cluster():
    import ray
    if ray.is_initialized():
        pytest.skip("the multinode tier needs a process without Ray already up: run it alone "
                    "(make test-multinode, or pytest -m multinode)")
    with LocalCluster(workers=2, head_cpus=1, worker_cpus=1) as c:
        yield c


def train_cfg(c: LocalCluster, storage: Path, *extra: str) -> dict:
    return validate(compose("train", [
        "+experiment=adult_mlp", "train.epochs=6", "train.early_stopping=null", "tracking=none",
        "scaling.num_workers=2", "+scaling.resources_per_worker.spot=1",
        "scaling.resources_per_worker.CPU=0.5", "failure.max_failures=1",
        f"storage.uri={storage}", f"ray.address={c.address}", "cost.sample_s=1",
        "ray.env_vars.RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=10", *extra]),
        TrainJobCfg).model_dump(by_alias=True)


def run_dir(cfg: dict, rec_name: str | None = None) -> Path:
    from mlops_ray.data import load_table
    from mlops_ray.data.io import dataset_version
    from mlops_ray.train.trainer import run_name_for
    name = rec_name or run_name_for(cfg, dataset_version(load_table("builtin://adult")))
    return Path(cfg["storage"]["uri"]) / "runs" / name


def final_weights(rec: dict) -> dict:
    path = Path(rec["checkpoints"]["latest"].removeprefix("file://"), "state.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The same run, uninterrupted, on the same cluster."""
    return run_training(train_cfg(cluster, tmp_path_factory.mktemp("ref")))


def test_node_loss_resumes_to_identical_weights(cluster, reference, tmp_path):
    cfg = train_cfg(cluster, tmp_path)
    rd = run_dir(cfg)
    run = Background(lambda: run_training(cfg))
    wait_for(lambda: "checkpoint_e0002_s00000" in checkpoints(rd), 300,
             "the second checkpoint", abort=run.done)
    cluster.kill(cluster.workers[-1])  # hard loss: no drain, no notice
    cluster.add()                      # what the autoscaler does
    rec = run.result(600)
    assert rec["status"] == "finished" and len(rec["history"]) == 6
    assert rec["restarts"] >= 1 and rec["preemptions_survived"] == 0
    assert rec["restored_from"]["epoch"] >= 2  # from the last checkpoint, not from scratch
    assert_same_weights(final_weights(reference), final_weights(rec))
    # the cost accounting saw the head and both spot pools' nodes
    assert rec["cost"]["node_hours"] > 0 and rec["cost"]["pools"]["worker"]["market"] == "spot"
    assert rec["cost"]["pools"]["head"]["market"] == "on_demand"


def test_preemption_notice_saves_every_completed_step(cluster, reference, tmp_path,
                                                      monkeypatch):
    from mlops_ray.cluster.spot_watcher import watch
    step_log = tmp_path / "steps.log"
    monkeypatch.setenv("MLOPS_RAY_STEP_LOG", str(step_log))
    # max_failures=0: only the separate preemption budget can absorb this restart
    cfg = train_cfg(cluster, tmp_path, "checkpoint.preemption_check_every_n_steps=4",
                    "failure.max_failures=0")
    rd = run_dir(cfg)
    run = Background(lambda: run_training(cfg))
    wait_for(lambda: "checkpoint_e0002_s00000" in checkpoints(rd), 300,
             "the second checkpoint", abort=run.done)
    node = cluster.workers[-1]
    metadata = FakeMetadata()
    try:
        # the watcher on that node polls the (fake) AWS metadata and drains it as PREEMPTION
        watcher = threading.Thread(target=watch, args=(
            "aws", metadata.url, cluster.address, node.node_id, 0.2, 600), daemon=True)
        watcher.start()
        metadata.notify(15)  # the cloud's two-minute warning, shortened
        deadline = time.time() + 15

        def jit():
            for name in checkpoints(rd):
                if json.loads((rd / name / "meta.json").read_text()).get("jit"):
                    return name
        name = wait_for(jit, 120, "a just-in-time checkpoint", abort=run.done)
    finally:
        metadata.close()
    cluster.add()  # the autoscaler's replacement, while the drained node sees out its notice

    def starts():
        return [t for t, ev, *_ in read_step_log(step_log) if ev == "start"]
    # at the drain deadline Ray Train restarts the group (a preemption, not a failure) on the
    # nodes it may use; then the cloud takes the drained node
    wait_for(lambda: len(starts()) >= 2, 120, "the restart at the drain deadline",
             abort=run.done)
    restarted = starts()[1]
    assert restarted >= deadline - 1, "restarted before the notice ran out"
    cluster.kill(node)
    rec = run.result(600)
    assert rec["status"] == "finished" and len(rec["history"]) == 6
    assert rec["preemptions_survived"] == 1 and rec["restored_from"]["jit"] is True
    restored = (rec["restored_from"]["epoch"], rec["restored_from"]["step"])
    assert name == f"checkpoint_e{restored[0]:04d}_s{restored[1]:05d}"
    # no completed step lost: the last step before the restart is the one restored
    steps = [(e, s) for t, ev, e, s, _ in read_step_log(step_log)
             if ev == "step" and t < restarted]
    last = steps[-1]
    if restored[1]:  # mid-epoch: (epoch, steps done in it)
        assert last == restored, (last, restored)
    else:  # the drain was seen at an epoch end: that whole epoch was saved
        assert last[0] == restored[0] - 1, (last, restored)
    assert_same_weights(final_weights(reference), final_weights(rec))


def test_node_loss_during_tuning_resumes_trials(cluster, tmp_path):
    import optuna

    from mlops_ray.db import db_url
    from mlops_ray.storage import from_cfg
    from mlops_ray.tune.tuner import run_tuning
    job = validate(compose("tune", [
        "+experiment=adult_mlp", "tune.num_samples=3", "tune.max_concurrent_trials=2",
        "train.epochs=5", "scheduler=fifo", "tracking=none", f"storage.uri={tmp_path}",
        "+scaling.resources_per_worker.spot=1", "scaling.resources_per_worker.CPU=0.5",
        f"ray.address={cluster.address}", "cost.sample_s=1"]), TuneJobCfg).model_dump(by_alias=True)
    run = Background(lambda: run_tuning(job))

    def second_checkpoint():
        return any(len(list(d.glob("checkpoint_*"))) >= 2
                   for d in (tmp_path / "tune").glob("*/*") if d.is_dir())
    wait_for(second_checkpoint, 300, "a trial's second checkpoint", abort=run.done)
    cluster.kill(cluster.workers[-1])
    cluster.add()
    s = run.result(900)
    assert s["n_trials"] == 3 and all(t["status"] == "TERMINATED" for t in s["trials"])
    assert all(t["epochs"] == 5 for t in s["trials"])
    assert s["resumed_trials"] >= 1  # the lost trial went on from its checkpoint
    study = optuna.load_study(study_name=s["study"],
                              storage=db_url(job["db"], from_cfg(job["storage"])))
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3, states  # the study is intact: no trial lost or doubled


def test_elastic_run_shrinks_and_grows_back(cluster, tmp_path):
    # Ray's autoscaling coordinator looks at the cluster's nodes every 20 s: the run must last
    # well beyond that after the node comes back (small batches: longer epochs)
    epochs = 30
    cfg = train_cfg(cluster, tmp_path, "scaling.num_workers=[1,2]",
                    "scaling.resources_per_worker.CPU=1", f"train.epochs={epochs}",
                    "train.batch_size=32", "scaling.elastic_resize_monitor_interval_s=2")
    rd = run_dir(cfg)
    run = Background(lambda: run_training(cfg))
    wait_for(lambda: "checkpoint_e0002_s00000" in checkpoints(rd), 300,
             "the second checkpoint", abort=run.done)
    cluster.kill(cluster.workers[-1])

    def world(name: str) -> int:
        return json.loads((rd / name / "meta.json").read_text())["metrics"].get("world_size", 0)
    wait_for(lambda: any(world(n) == 1 for n in checkpoints(rd)), 300,
             "an epoch on the one node left", abort=run.done)
    cluster.add()
    rec = run.result(600)
    sizes = [m["world_size"] for m in rec["history"]]
    assert rec["status"] == "finished" and len(sizes) == epochs
    first_one = sizes.index(1)
    assert sizes[0] == 2 and 2 in sizes[first_one:], sizes  # 2 -> 1 -> 2
