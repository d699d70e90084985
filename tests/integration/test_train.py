"""Ray Train on the shared local cluster: the run record on two DDP workers, dashboard metrics,
a killed worker, resume after a killed driver (bit-exact), and S3 storage against a local moto
server."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.train import TrainJob
from mlops_ray.data import dataset_version, load_table
from mlops_ray.train.driver import run_training
from tests.conftest import wait_until, wandb_history

pytestmark = pytest.mark.ray


def job_cfg(*overrides: str) -> TrainJob:
    return validate(compose("train", list(overrides)), TrainJob)


def final_weights(record: dict) -> dict[str, torch.Tensor]:
    path = record["checkpoints"]["latest"].removeprefix("file://")
    return torch.load(Path(path) / "state.pt", weights_only=False)["model"]


def test_run_record_lineage_metrics_and_wandb_on_two_ddp_workers(ray_2_cpus, tmp_path, gate):
    """DDP over two Train workers: the run record's lineage, and W&B written by rank 0 as it
    trains (held in its last epoch, the W&B run already exists in the worker), one W&B run
    id for the loop and the driver's summary."""
    from mlops_ray.cluster.rehearsal import Background
    gate.hold(epoch=2, step=1)
    cfg = job_cfg("+experiment=german_mlp", f"storage.uri={tmp_path}", "train.epochs=3",
                  "train.early_stopping=null", "scaling.num_workers=2",
                  "scaling.resources_per_worker.CPU=0.5")
    run = cfg.run_name(dataset_version(load_table("builtin://german")))
    bg = Background(lambda: run_training(cfg))
    try:
        wait_until(lambda: len(gate.events("waiting")) == 2 or bg.done(), 180,
                   what="both ranks held in the last epoch")
        assert not bg.done(), bg.result(1)
        live = list((tmp_path / "wandb").glob(f"wandb/offline-run-*-{run}"))
        assert len(live) == 1, "rank 0 opens its W&B run when training starts, not at the end"
    finally:
        gate.release()
    rec = bg.result(300)
    on_disk = json.loads((tmp_path / "runs" / rec["run_name"] / "run.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["run_name"] == run
    assert on_disk["world_size"] == 2  # DDP over two Train workers
    assert on_disk["dataset"]["version"] == dataset_version(load_table("builtin://german"))
    assert on_disk["config"]["model"]["hidden"] == [64, 32] and len(on_disk["config_hash"]) == 12
    assert on_disk["code_version"]["package"] and "git_commit" in on_disk["code_version"]
    assert on_disk["versions"]["ray"] == "2.60.0" and on_disk["seed"] == 0
    assert [m["epoch"] for m in on_disk["history"]] == [0, 1, 2]
    assert 0.6 < on_disk["test"]["test/auc"] <= 1.0
    assert Path(on_disk["checkpoints"]["best"].removeprefix("file://"), "state.pt").exists()
    # the loop's W&B run holds one history row per epoch; the driver's summary continues the
    # same run id in a second offline folder (`wandb sync` uploads both into one run)
    runs = sorted((tmp_path / "wandb").glob(f"wandb/offline-run-*-{run}"))
    assert len(runs) == 2 and runs[0] == live[0] and Path(on_disk["tracking_dir"]) == runs[1]
    rows = wandb_history(live[0] / f"run-{run}.wandb")
    assert [(r["_step"], r["epoch"]) for r in rows] == [(0, 0), (1, 1), (2, 2)]
    assert [r["val/auc"] for r in rows] == [m["val/auc"] for m in on_disk["history"]]
    assert wandb_history(runs[1] / f"run-{run}.wandb") == []  # the summary only
    import subprocess
    import sys
    sync = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run",
                           *map(str, runs)], capture_output=True, text=True, timeout=120)
    assert "Would sync 2 run(s)" in sync.stdout + sync.stderr, sync.stdout + sync.stderr


ADULT_SHORT = ["+experiment=adult_mlp", "train.epochs=3", "train.early_stopping=null",
               "tracking=none"]


def test_metrics_then_a_killed_worker_process_is_survived(ray_2_cpus, tmp_path, gate):
    """Held in its second epoch: samples/s, epoch and checkpoint time are on Ray's Prometheus
    endpoint; then its Train worker process is SIGKILLed and Ray Train restarts the group from
    the committed checkpoint."""
    import os

    import requests

    from mlops_ray.cluster.rehearsal import Background
    from tests.conftest import committed, kill_pids
    gate.hold(epoch=1, step=10)
    cfg = job_cfg(*ADULT_SHORT, f"storage.uri={tmp_path}")
    run = cfg.run_name(dataset_version(load_table("builtin://adult")))
    run_dir = tmp_path / "runs" / run
    bg = Background(lambda: run_training(cfg))
    names = ("samples_per_second", "epoch_seconds", "checkpoint_seconds", "epoch",
             "preemptions_survived", "restarts")

    def scraped():
        text = requests.get(f"http://127.0.0.1:{os.environ['MLOPS_TEST_RAY_METRICS_PORT']}"
                            "/metrics", timeout=10).text
        got = {n: x for x in text.splitlines() for n in names
               if x.startswith(f"ray_mlops_train_{n}{{") and f'run="{run}"' in x}
        return got if len(got) == len(names) else None
    try:
        wait_until(lambda: gate.events("waiting") or bg.done(), 180, what="the run at epoch 1")
        got = wait_until(scraped, 180, interval=1, what="training metrics on Ray's endpoint")
        assert float(got["samples_per_second"].rsplit(" ", 1)[1]) > 0
        assert float(got["epoch"].rsplit(" ", 1)[1]) == 1  # held in its second epoch
        assert float(got["restarts"].rsplit(" ", 1)[1]) == 0
        wait_until(lambda: "checkpoint_e0001_s00000" in committed(run_dir), 60,
                   what="the first checkpoint committed")
        kill_pids([e["pid"] for e in gate.events("waiting")])  # the Train worker process
    finally:
        gate.release()
    rec = bg.result(300)
    assert rec["status"] == "finished" and len(rec["history"]) == 3
    # Ray Train restarted the worker group, which resumed from the committed checkpoint
    assert rec["restarts"] == 1
    assert rec["restored_from"] == {"epoch": 1, "step": 0, "jit": False}


def test_killed_driver_resumes_to_identical_weights(ray_2_cpus, adult_run, tmp_path, gate):
    """SIGKILL of `python -m jobs.train` mid-run, then the same command again: the weights of
    the session's uninterrupted run of the same config (the CI profile's two epochs)."""
    import subprocess
    import sys

    from tests.conftest import REPO, committed, job_env
    same = ["+experiment=adult_mlp", "train.epochs=2", "tracking=none",
            f"storage.uri={tmp_path}"]
    cfg = job_cfg(*same)
    assert cfg.config_hash() == adult_run["config_hash"]  # the same run, stored elsewhere
    gate.hold(epoch=1, step=10)  # the driver is killed while its run waits here
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *same,
                             f"ray.address={ray_2_cpus}"], cwd=REPO, env=job_env(**gate.env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / adult_run["run_name"]
    try:
        wait_until(lambda: gate.events("waiting") or proc.poll() is not None, 240,
                   what="the run held at epoch 1")
        assert proc.poll() is None, "the driver died before it was killed"
        wait_until(lambda: "checkpoint_e0001_s00000" in committed(run_dir), 60,
                   what="the first checkpoint committed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    # Ray ends a dead driver's actors: its held Train worker must be gone before the rerun
    held = [e["pid"] for e in gate.events("waiting")]
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in held), 60,
               what="the killed driver's Train worker ended by Ray")
    gate.release()
    resumed = run_training(cfg)  # what the rerun of the same command does, in this process
    assert resumed["status"] == "finished" and resumed["resumed"] is True
    # from the newest checkpoint committed before the kill, redoing the steps after it
    assert resumed["restored_from"] == {"epoch": 1, "step": 0, "jit": False}
    a, b = final_weights(adult_run), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.s3
def test_s3_storage_and_dataset_resume(ray_2_cpus, moto_s3, bucket, tmp_path):
    import boto3
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    local_csv = tmp_path / "german.csv"
    load_table("builtin://german").to_csv(local_csv, index=False)
    s3.upload_file(str(local_csv), bucket, "data/german.csv")
    overrides = ["+experiment=german_mlp", "train.epochs=2", "tracking=none", "storage=s3",
                 f"storage.uri=s3://{bucket}/mlops", f"storage.endpoint_url={moto_s3}",
                 f"dataset.uri=s3://{bucket}/data/german.csv"]
    first = run_training(job_cfg(*overrides))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlops/")["Contents"]}
    run_prefix = f"mlops/runs/{first['run_name']}/"
    assert run_prefix + "run.json" in keys
    assert any(k.startswith(run_prefix + "checkpoint_e0002_s00000/") for k in keys)
    assert first["checkpoints"]["latest"].startswith(f"s3://{bucket}/")
    again = run_training(job_cfg(*overrides))  # the same command again resumes from S3
    assert again["resumed"] is True
    assert again["restored_from"] == {"epoch": 2, "step": 0, "jit": False}
    assert again["history"] == first["history"]


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_trees_on_two_workers_survive_a_killed_worker_without_redoing_rounds(
        ray_2_cpus, tmp_path, gate, library):
    """One distributed booster over two Train workers (XGBoost's collective / LightGBM's
    network), held 5 rounds into its third report; both worker processes are SIGKILLed after
    the round-20 checkpoint is committed, and the restarted group continues from round 20:
    the rounds after it are boosted once, and the kept model is the early-stopped cut."""
    from mlops_ray.cluster.rehearsal import Background
    from tests.conftest import committed, kill_pids
    gate.hold(epoch=2, step=5)
    cfg = job_cfg("+experiment=adult_mlp", f"model={library}", "model.num_boost_round=60",
                  "model.rounds_per_report=10", "model.checkpoint_every_n_rounds=10",
                  "tracking=none", f"storage.uri={tmp_path}",
                  "scaling.num_workers=2", "scaling.resources_per_worker.CPU=0.5")
    run_dir = tmp_path / "runs" / cfg.run_name(dataset_version(load_table("builtin://adult")))
    bg = Background(lambda: run_training(cfg))
    try:
        wait_until(lambda: len(gate.events("waiting")) == 2 or bg.done(), 180,
                   what="both ranks held at round 25")
        assert not bg.done(), bg.result(1)
        wait_until(lambda: "checkpoint_r000020" in committed(run_dir), 60,
                   what="the round-20 checkpoint committed")
        kill_pids([e["pid"] for e in gate.events("waiting")])
    finally:
        gate.release()
    rec = bg.result(300)
    assert rec["status"] == "finished" and rec["world_size"] == 2 and rec["restarts"] == 1
    assert rec["restored_from"] == {"epoch": 2, "round": 20, "jit": False}
    assert [m["round"] for m in rec["history"]] == [10, 20, 30, 40, 50, 60]
    assert rec["config"]["model"]["library"] == library
    assert rec["best"]["round"] == rec["best"]["best_round"] <= 60
    assert 0.9 < rec["test"]["test/auc"] <= 1.0
    top = rec["feature_importance"]  # the top 20 of ~100 inputs, by share of total gain
    assert len(top) == 20 and 0.5 < sum(top.values()) <= 1 + 1e-9
    model_dir = Path(rec["checkpoints"]["best"].removeprefix("file://"))
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["model"]["_target_"] == "mlops_ray.models.trees.Trees"
    assert meta["round"] == rec["best"]["best_round"]
