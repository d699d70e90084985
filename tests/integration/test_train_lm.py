"""The GPT workload (task: lm) on Ray Train, shared local Ray: `python -m jobs.train
+experiment=gpt_synthetic` end to end, DDP and FSDP2 over 2 CPU workers (gloo), a killed worker
group resuming, and arm (b) of bench/gpu_train.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.lm import LmJob
from mlops_ray.train.driver import run_training
from mlops_ray.train.session import LocalSession
from mlops_ray.train.tasks.lm import lm_train_loop_per_worker, loop_config
from tests.conftest import REPO

pytestmark = pytest.mark.ray

TWO_WORKERS = ["scaling.num_workers=2", "scaling.resources_per_worker.CPU=0.5",
               "tracking=none", "train.torch_threads=1"]


def lm_cfg(*overrides: str) -> dict:
    return validate(compose("train", ["+experiment=gpt_synthetic", *overrides]),
                    LmJob)


def one_process(tmp_path: Path, *overrides: str) -> dict:
    """The same run as one plain process (no Ray, no DDP): the reference trajectory."""
    lc = loop_config(lm_cfg(*TWO_WORKERS, *overrides), "reference")
    return lm_train_loop_per_worker(lc.plain(), LocalSession(str(tmp_path / "reference"),
                                                             resume=True))


def test_jobs_train_gpt_synthetic_trains_and_records(ray_2_cpus, tmp_path):
    """What `python -m jobs.train +experiment=gpt_synthetic` does, in this process (the entry
    point itself runs in tests/e2e)."""
    from mlops_ray.train.driver import summary_lines
    rec = run_training(lm_cfg(f"storage.uri={tmp_path}", "train.torch_threads=1"),
                       log=lambda _: None)
    summary = "\n".join(summary_lines(rec))
    assert "throughput" in summary and "tokens/s" in summary
    (path,) = tmp_path.glob("runs/gpt_synthetic-*/run.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "finished" and rec["task"] == "lm"
    h = rec["history"]
    assert [m["step"] for m in h] == [10, 20, 30, 40, 50, 60]
    assert h[0]["train/loss"] > 5.0 and h[-1]["train/loss"] < h[0]["train/loss"] - 3.0
    assert rec["final"]["val/loss"] < 2.0 and rec["best"]["val/loss"] == rec["final"]["val/loss"]
    assert all(m["perf/tokens_per_s"] > 0 and m["perf/mfu"] is None for m in h)
    s = rec["summary"]
    assert s["timed_steps"] == 55 and s["tokens_per_s"] > 0 and s["device"] == "cpu"
    assert Path(rec["checkpoints"]["best"].removeprefix("file://"), "state.pt").exists()
    assert list(Path(rec["tracking_dir"]).rglob("*.wandb")), "offline W&B run file missing"


def test_ddp_two_workers_follow_the_single_process_run(ray_2_cpus, tmp_path):
    ov = ["train.epochs=2", f"storage.uri={tmp_path}"]
    rec = run_training(lm_cfg(*TWO_WORKERS, *ov))
    ref = one_process(tmp_path, *ov)
    assert rec["world_size"] == 2 and rec["summary"]["strategy"] == "ddp"
    # each worker trains on its half of the global batch; DDP averages the gradients
    assert [m["train/loss"] for m in rec["history"]] == pytest.approx(
        [m["train/loss"] for m in ref["history"]], abs=1e-3)
    assert rec["history"][-1]["train/loss"] < rec["history"][0]["train/loss"] - 2.0


def test_fsdp_two_workers_survive_a_killed_worker_group(ray_2_cpus, tmp_path, gate):
    """FSDP2 over gloo (torch >= 2.6 shards on CPU): both workers are SIGKILLed while held at
    step 35, after the third checkpoint; Ray Train restarts them from that committed (full,
    unsharded) checkpoint and the run ends where an uninterrupted single-process run ends."""
    from mlops_ray.cluster.rehearsal import Background
    from tests.conftest import committed, kill_pids, wait_until
    ov = ["train.epochs=6", "lm.steps_per_epoch=10", "failure.max_failures=2",
          f"storage.uri={tmp_path}"]
    cfg = lm_cfg(*TWO_WORKERS, "lm.strategy=fsdp", *ov)
    gate.hold(epoch=3, step=5)
    run = Background(lambda: run_training(cfg))
    wait_until(lambda: len(gate.events("waiting")) == 2 or run.done(), 240,
               what="both workers held at step 35")
    (run_dir,) = (tmp_path / "runs").glob("gpt_synthetic-*")
    wait_until(lambda: "checkpoint_e0003_s00000" in committed(run_dir), 60,
               what="the third checkpoint committed")
    kill_pids([e["pid"] for e in gate.events("waiting")])
    gate.release()
    rec = run.result(300)
    assert rec["status"] == "finished" and rec["summary"]["strategy"] == "fsdp"
    assert rec["restarts"] == 1 and rec["restored_from"]["step"] == 30
    ref = one_process(tmp_path, *ov)  # DDP's math in one process: FSDP needs a process group
    assert rec["final"]["step"] == 60
    assert rec["final"]["val/loss"] == pytest.approx(ref["history"][-1]["val/loss"], abs=1e-3)


def test_bench_jobs_train_arm(ray_2_cpus):
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "bench" / "gpu_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from mlops_ray.models.gpt import GPTConfig
    bare = bench.run_bare(GPTConfig.from_size("tiny"), batch=4, steps=12, warmup=2,
                          compile=False, dtype="fp32", device="cpu")
    row = bench.run_jobs_train("tiny", batch=4, steps=12, warmup=2, compile=False,
                               dtype="fp32", ray_address=ray_2_cpus)
    assert row["variant"] == "jobs.train eager fp32" and row["timed_steps"] == 10
    assert row["tokens_per_s"] > 0 and row["mfu_pct"] is None
    table = bench.format_table([bare, row])
    assert "bare eager fp32" in table and "jobs.train eager fp32" in table
    assert bench.ratio_line(bare, row).startswith("ratio (b)/(a): tokens/s ")
