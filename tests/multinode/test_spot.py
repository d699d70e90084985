"""Node loss and spot preemption on a real multi-node Ray cluster on this machine.

Head + 2 spot worker nodes (`ray.cluster_utils.Cluster`, one raylet each). The driver runs in a
thread of this process, on the head; the main thread kills and replaces worker nodes. This tier
needs its own process (`make test-multinode`; `make test` runs it after the others): the other
tiers share one single-node Ray that is already up in theirs.

Every fault is injected while the run is held at a known step by a step gate
(`mlops_ray.train.gate`): the run cannot finish, or move on, before the test has acted, so the
outcome is the same on a fast machine, a slow one, or one with a core busy elsewhere.
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
from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.train import TrainJob
from mlops_ray.config.tune import TuneJob
from mlops_ray.train.driver import run_training
from tests.conftest import committed

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def cluster():
    import ray
    if ray.is_initialized():
        pytest.skip("the multinode tier needs a process without Ray already up: run it alone "
                    "(make test-multinode, or pytest -m multinode)")
    with LocalCluster(workers=2, head_cpus=1, worker_cpus=1, dashboard=True) as c:
        yield c


def train_cfg(c: LocalCluster, storage: Path, *extra: str) -> TrainJob:
    return validate(compose("train", [
        "+experiment=adult_mlp", "train.epochs=6", "train.early_stopping=null", "tracking=none",
        "scaling.num_workers=2", "+scaling.resources_per_worker.spot=1",
        "scaling.resources_per_worker.CPU=0.5", "failure.max_failures=1",
        f"storage.uri={storage}", f"ray.address={c.address}", "cost.sample_s=1",
        "ray.env_vars.RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=10", *extra]),
        TrainJob)


def run_dir(cfg: TrainJob) -> Path:

    from mlops_ray.data import load_table
    from mlops_ray.data.io import dataset_version
    name = cfg.run_name(dataset_version(load_table("builtin://adult")))
    return Path(cfg.storage.uri) / "runs" / name


def until(cond, what: str, run: Background, timeout: float = 300):
    """Wait for `cond`; a run that ends first has failed (the gate keeps a healthy one)."""
    try:
        return wait_for(cond, timeout, what, abort=run.done)
    except RuntimeError:
        run.result(0)  # its own error, if it has one
        raise


def lose(cluster: LocalCluster, node_id: str, gate, run: Background) -> None:
    """A VM pulled away: its Ray node dies and every process on it with it, at once. (Ray's
    workers notice their raylet's death later, in their own time: a held worker released
    before then could still finish steps, and checkpoints, for a node that is gone.)"""
    import os
    import signal
    pids = [e["pid"] for e in gate.events("waiting") if e["node_id"] == node_id]
    assert pids, f"no held process on node {node_id}"
    cluster.kill(cluster.node(node_id))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone with its raylet already

    def gone(pid: int) -> bool:
        try:
            return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()  # dead, unreaped
        except FileNotFoundError:
            return True
    until(lambda: all(gone(p) for p in pids), "the lost node's held processes gone", run, 60)


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


def test_node_loss_resumes_to_identical_weights(cluster, reference, tmp_path, gate):
    gate.hold(epoch=2, step=10)
    cfg = train_cfg(cluster, tmp_path)
    rd = run_dir(cfg)
    run = Background(lambda: run_training(cfg))
    until(lambda: len(gate.events("waiting")) == 2, "both workers held at epoch 2, step 10", run)
    until(lambda: "checkpoint_e0002_s00000" in committed(rd), "epoch 1's checkpoint committed",
          run)
    (victim,) = gate.events("waiting", rank=1)
    lose(cluster, victim["node_id"], gate, run)  # hard loss: no drain, no notice
    gate.release()
    cluster.add()                      # what the autoscaler does
    rec = run.result(600)
    assert rec["status"] == "finished" and len(rec["history"]) == 6
    assert rec["restarts"] == 1 and rec["preemptions_survived"] == 0
    # from the last committed checkpoint, not from scratch; steps after it are redone
    assert rec["restored_from"] == {"epoch": 2, "step": 0, "jit": False}
    assert_same_weights(final_weights(reference), final_weights(rec))
    # the cost accounting saw the head and both spot pools' nodes
    assert rec["cost"]["node_hours"] > 0 and rec["cost"]["pools"]["worker"]["market"] == "spot"
    assert rec["cost"]["pools"]["head"]["market"] == "on_demand"


def test_preemption_notice_saves_every_completed_step(cluster, reference, tmp_path, gate,
                                                      monkeypatch):
    from mlops_ray.cluster.spot_watcher import watch
    step_log = tmp_path / "steps.log"
    monkeypatch.setenv("MLOPS_RAY_STEP_LOG", str(step_log))
    # the run waits after step 20 of epoch 2 until a drain is announced: it cannot end first
    gate.hold(epoch=2, step=20)
    # max_failures=0: only the separate preemption budget can absorb this restart
    cfg = train_cfg(cluster, tmp_path, "failure.max_failures=0")
    rd = run_dir(cfg)
    run = Background(lambda: run_training(cfg))
    until(lambda: len(gate.events("waiting")) == 2, "both workers held at epoch 2, step 20", run)
    (victim,) = gate.events("waiting", rank=1)
    node = cluster.node(victim["node_id"])
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
        name = until(jit, "a just-in-time checkpoint", run, 120)
    finally:
        metadata.close()
    assert name == "checkpoint_e0002_s00020"  # at the held step
    assert len(gate.events("drained")) == 2
    gate.release()  # the restarted group goes on past the held step
    cluster.add()  # the autoscaler's replacement, while the drained node sees out its notice

    def starts():
        return [t for t, ev, *_ in read_step_log(step_log) if ev == "start"]
    # at the drain deadline Ray Train restarts the group (a preemption, not a failure) on the
    # nodes it may use; then the cloud takes the drained node
    until(lambda: len(starts()) >= 2, "the restart at the drain deadline", run, 120)
    restarted = starts()[1]
    assert restarted >= deadline - 1, "restarted before the notice ran out"
    cluster.kill(node)
    rec = run.result(600)
    assert rec["status"] == "finished" and len(rec["history"]) == 6
    assert rec["preemptions_survived"] == 1
    assert rec["restored_from"] == {"epoch": 2, "step": 20, "jit": True}
    # no completed step lost: the last step before the restart is the one restored
    steps = [(e, s) for t, ev, e, s, _ in read_step_log(step_log)
             if ev == "step" and t < restarted]
    assert steps[-1] == (2, 20), steps[-3:]
    assert_same_weights(final_weights(reference), final_weights(rec))


def test_node_loss_during_tuning_resumes_trials(cluster, tmp_path, gate):
    import optuna
    from ray.util.state import list_actors

    from mlops_ray.db import db_url
    from mlops_ray.storage import from_cfg
    from mlops_ray.tune.tuner import run_tuning
    gate.hold(epoch=3, step=10)  # every trial waits there, after its third checkpoint
    job = validate(compose("tune", [
        "+experiment=adult_mlp", "tune.num_samples=3", "tune.max_concurrent_trials=2",
        "train.epochs=5", "scheduler=fifo", "tracking=none", f"storage.uri={tmp_path}",
        "+scaling.resources_per_worker.spot=1", "scaling.resources_per_worker.CPU=0.5",
        f"ray.address={cluster.address}", "cost.sample_s=1"]), TuneJob)
    run = Background(lambda: run_tuning(job))
    until(lambda: len({e["run"] for e in gate.events("waiting")}) == 2,
          "two running trials held at epoch 3, step 10", run)
    held = gate.events("waiting")[0]
    trial_id = held["run"].removeprefix("trial-")
    # Ray's state API: which node hosts that trial's actor, and is it alive right now
    (actor,) = list_actors(filters=[("pid", "=", held["pid"]), ("state", "=", "ALIVE")])
    assert actor.node_id == held["node_id"]
    (trial_dir,) = (tmp_path / "tune").glob(f"*/trial_{trial_id}")
    assert (trial_dir / "checkpoint_000002").is_dir()  # it has a checkpoint to resume from
    lose(cluster, actor.node_id, gate, run)
    gate.release()
    cluster.add()
    s = run.result(900)
    assert s["n_trials"] == 3 and all(t["status"] == "TERMINATED" for t in s["trials"])
    assert all(t["epochs"] == 5 for t in s["trials"])
    resumed = {t["trial_id"]: t["restored_from_epoch"] for t in s["trials"]
               if t["restored_from_epoch"] >= 0}
    assert resumed == {trial_id: 3}, resumed  # the lost trial, from its last checkpoint
    study = optuna.load_study(study_name=s["study"],
                              storage=db_url(job.db.plain(), from_cfg(job.storage.plain())))
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3, states  # the study is intact: no trial lost or doubled


def test_elastic_run_shrinks_and_grows_back(cluster, tmp_path, gate):
    cfg = train_cfg(cluster, tmp_path, "scaling.num_workers=[1,2]",
                    "scaling.resources_per_worker.CPU=1", "train.epochs=8",
                    "scaling.elastic_resize_monitor_interval_s=2")
    rd = run_dir(cfg)
    gate.hold(epoch=3, step=10)
    run = Background(lambda: run_training(cfg))
    until(lambda: len(gate.events("waiting", world=2)) == 2, "2 workers held at epoch 3", run)
    until(lambda: "checkpoint_e0003_s00000" in committed(rd), "epoch 2's checkpoint committed",
          run)
    (victim,) = gate.events("waiting", rank=1, world=2)
    lose(cluster, victim["node_id"], gate, run)
    gate.hold(epoch=5, step=10)  # the shrunk run trains epochs 3 and 4 on the node left
    until(lambda: gate.events("waiting", world=1, epoch=5), "1 worker held at epoch 5", run)
    until(lambda: "checkpoint_e0005_s00000" in committed(rd), "epoch 4's checkpoint committed",
          run)
    cluster.add()  # Ray Train grows the group back: a restart from that checkpoint
    until(lambda: len(gate.events("waiting", world=2, epoch=5)) == 2,
          "2 workers again at epoch 5", run)
    gate.release()
    rec = run.result(600)
    assert rec["status"] == "finished"
    assert [m["world_size"] for m in rec["history"]] == [2, 2, 2, 1, 1, 2, 2, 2]
