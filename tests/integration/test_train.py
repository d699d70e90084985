"""Ray Train on the shared local cluster: records, DDP, resume after a killed driver (bit-exact),
a killed worker, and S3 storage against a local moto server."""
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
from tests.conftest import run_job, wait_until

pytestmark = pytest.mark.ray


def job_cfg(*overrides: str) -> TrainJob:
    return validate(compose("train", list(overrides)), TrainJob)


def final_weights(record: dict) -> dict[str, torch.Tensor]:
    path = record["checkpoints"]["latest"].removeprefix("file://")
    return torch.load(Path(path) / "state.pt", weights_only=False)["model"]


def test_run_record_lineage_metrics_and_wandb(ray_2_cpus, tmp_path):
    cfg = job_cfg("+experiment=german_mlp", f"storage.uri={tmp_path}", "train.epochs=3",
                  "train.early_stopping=null")
    rec = run_training(cfg)
    on_disk = json.loads((tmp_path / "runs" / rec["run_name"] / "run.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["run_name"] == cfg.run_name(
        dataset_version(load_table("builtin://german")))
    assert on_disk["dataset"]["version"] == dataset_version(load_table("builtin://german"))
    assert on_disk["config"]["model"]["hidden"] == [64, 32] and len(on_disk["config_hash"]) == 12
    assert on_disk["code_version"]["package"] and "git_commit" in on_disk["code_version"]
    assert on_disk["versions"]["ray"] == "2.60.0" and on_disk["seed"] == 0
    assert [m["epoch"] for m in on_disk["history"]] == [0, 1, 2]
    assert 0.6 < on_disk["test"]["test/auc"] <= 1.0
    assert Path(on_disk["checkpoints"]["best"].removeprefix("file://"), "state.pt").exists()
    wandb_dir = Path(on_disk["tracking_dir"])
    assert list(wandb_dir.rglob("*.wandb")), "offline W&B run file missing"


def test_training_publishes_dashboard_metrics(ray_2_cpus, tmp_path, gate):
    """samples/s, epoch and checkpoint time reach Ray's Prometheus endpoint while it trains
    (held at epoch 2 until they have been scraped)."""
    import os

    import requests

    from mlops_ray.cluster.rehearsal import Background
    gate.hold(epoch=2, step=5)
    cfg = job_cfg(*ADULT_SHORT, f"storage.uri={tmp_path}")
    run = cfg.run_name(dataset_version(load_table("builtin://adult")))
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
        wait_until(lambda: gate.events("waiting") or bg.done(), 180, what="the run at epoch 2")
        got = wait_until(scraped, 180, interval=1, what="training metrics on Ray's endpoint")
        assert float(got["samples_per_second"].rsplit(" ", 1)[1]) > 0
        assert float(got["epoch"].rsplit(" ", 1)[1]) == 2  # held in its third epoch
        assert float(got["restarts"].rsplit(" ", 1)[1]) == 0
    finally:
        gate.release()
    assert bg.result(300)["status"] == "finished"


def test_ddp_two_workers(ray_2_cpus, tmp_path):
    rec = run_training(job_cfg("+experiment=german_mlp", f"storage.uri={tmp_path}",
                               "train.epochs=2", "tracking=none", "scaling.num_workers=2",
                               "scaling.resources_per_worker.CPU=0.5"))
    assert rec["world_size"] == 2 and len(rec["history"]) == 2
    assert rec["test"]["test/auc"] > 0.6


ADULT_SHORT = ["+experiment=adult_mlp", "train.epochs=6", "train.early_stopping=null",
               "tracking=none"]


def test_killed_driver_resumes_to_identical_weights(ray_2_cpus, tmp_path, gate):
    """SIGKILL of jobs.train mid-run, rerun of the same command: same weights as no kill."""
    reference = run_training(job_cfg(*ADULT_SHORT, f"storage.uri={tmp_path / 'a'}"))
    args = ["jobs.train", *ADULT_SHORT, f"storage.uri={tmp_path / 'b'}",
            f"ray.address={ray_2_cpus}"]
    import subprocess
    import sys

    from tests.conftest import REPO, committed, job_env
    gate.hold(epoch=4, step=10)  # the driver is killed while its run waits here
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=job_env(**gate.env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "b" / "runs" / reference["run_name"]
    try:
        wait_until(lambda: gate.events("waiting") or proc.poll() is not None, 240,
                   what="the run held at epoch 4")
        assert proc.poll() is None, "the driver died before it was killed"
        wait_until(lambda: "checkpoint_e0004_s00000" in committed(run_dir), 60,
                   what="the fourth checkpoint committed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    done = run_job(args, timeout=300, MLOPS_RAY_STEP_GATE=None)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "run.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed"] is True
    # from the newest checkpoint committed before the kill, redoing the steps after it
    assert resumed["restored_from"] == {"epoch": 4, "step": 0, "jit": False}
    a, b = final_weights(reference), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_killed_worker_process_is_survived(ray_2_cpus, tmp_path, gate):
    from mlops_ray.cluster.rehearsal import Background
    from tests.conftest import committed, kill_pids
    gate.hold(epoch=3, step=10)
    cfg = job_cfg(*ADULT_SHORT, f"storage.uri={tmp_path}", "train.epochs=8")
    run_dir = tmp_path / "runs" / cfg.run_name(dataset_version(load_table("builtin://adult")))
    run = Background(lambda: run_training(cfg))
    wait_until(lambda: gate.events("waiting") or run.done(), 240, what="the run at epoch 3")
    wait_until(lambda: "checkpoint_e0003_s00000" in committed(run_dir), 60,
               what="the third checkpoint committed")
    kill_pids([e["pid"] for e in gate.events("waiting")])  # the Train worker process
    gate.release()
    rec = run.result(300)
    assert rec["status"] == "finished" and len(rec["history"]) == 8
    # Ray Train restarted the worker group, which resumed from the committed checkpoint
    assert rec["restarts"] == 1
    assert rec["restored_from"] == {"epoch": 3, "step": 0, "jit": False}


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
