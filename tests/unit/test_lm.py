"""The language-model workload (task: lm) without Ray: its config and the errors a user sees,
the loop's building blocks, and the per-worker loop called directly (loss, accumulation,
resume)."""
from __future__ import annotations

import math

import pytest
import torch

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.config import train_job_schema, validate
from mlops_ray.config.compose import compose
from mlops_ray.config.lm import LmJob
from mlops_ray.config.train import TrainJob
from mlops_ray.errors import ConfigError
from mlops_ray.models.gpt import GPT, GPTConfig
from mlops_ray.train.driver import summary_lines
from mlops_ray.train.session import LocalSession
from mlops_ray.train.tasks.lm import lm_train_loop_per_worker, loop_config
from mlops_ray.train.tasks.lm_ops import Prefetcher, lr_factor, param_groups, peak_for

LM = ["+experiment=gpt_synthetic"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model on a busy 2-core machine (see test_gpt.py)
    yield
    torch.set_num_threads(before)


def lm_cfg(*overrides: str) -> LmJob:
    composed = compose("train", [*LM, *overrides])
    return validate(composed, LmJob)


def lm_errors(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        lm_cfg(*overrides)
    return str(e.value)


def test_gpt_experiment_composes_to_the_lm_schema():
    composed = compose("train", LM)
    assert train_job_schema(composed) is LmJob
    assert train_job_schema(compose("train", ["+experiment=adult_mlp"])) is TrainJob
    job = validate(composed, LmJob)
    assert job.task == "lm" and job.model.size == "tiny" and job.train.precision == "fp32"
    assert job.lm.strategy == "ddp" and not job.lm.compile and job.total_steps() == 60
    assert job.checkpoint.checkpoint_score_attribute == "val/loss"
    assert job.lm.peak_tflops["H100"] == 989.0  # the per-GPU peak table lives in the config
    # the tabular schema refuses it with the key that marks it
    with pytest.raises(ConfigError, match="task: unknown key"):
        validate(composed, TrainJob)


def test_gpu_preset_is_the_reference_setup():
    # ray.address: validated as for a cluster (this machine's GPUs are not counted)
    job = lm_cfg("lm=gpu", "scaling=gpu", "ray.address=auto")
    assert job.model.size == "gpt_small" and job.train.precision == "bf16"
    assert job.lm.compile and job.lm.fused_optimizer and job.lm.tf32
    assert job.train.batch_size == 16 and job.optim.lr == 0.0006
    # presets stay overridable key by key
    assert lm_cfg("lm=gpu", "scaling=gpu", "ray.address=auto",
                  "lm.compile_mode=max-autotune").lm.compile_mode == "max-autotune"


@pytest.mark.parametrize("overrides,expected", [
    (["train.precision=bf16"], "train.precision='bf16' needs scaling.use_gpu=true"),
    (["train.batch_size=12", "lm.grad_accum_steps=8"],
     "train.batch_size=12 is not divisible by scaling.num_workers=1 x lm.grad_accum_steps=8"),
    (["lm.compile_mode=reduce-overhead"], "has no effect with lm.compile=false"),
    (["lm.warmup_steps=60"], "lm.warmup_steps=60 leaves no timed steps"),
    (["checkpoint.checkpoint_score_attribute=val/auc"],
     "checkpoint.checkpoint_score_attribute='val/auc' is not reported by task=lm"),
    (["checkpoint.checkpoint_score_order=max"], "keeps the worst checkpoints by val/loss"),
    (["train.fairness_penalty.kind=dp", "train.fairness_penalty.weight=1"],
     "train.fairness_penalty applies to tabular classifiers"),
    (["model.size=huge"], "model.size='huge': allowed gpt_small, tiny"),
    (["model.n_head=3"], "n_embd=64 is not divisible by n_head=3"),
    (["lm.strategy=zero3"], "lm.strategy='zero3'"),
    (["+lm.compiled=true"], "lm.compiled: unknown key"),
    (["scaling.num_workers=3"], "3 worker(s) x 1.0 CPU"),
])
def test_bad_lm_configs_name_the_field_and_what_is_allowed(overrides, expected):
    assert expected in lm_errors(*overrides)


def test_fsdp_with_one_worker_is_allowed():
    # it shards nothing; it is how the FSDP code path runs on a single GPU
    assert lm_cfg("lm.strategy=fsdp").lm.strategy == "fsdp"


def test_run_name_follows_what_is_computed():
    base = lm_cfg()
    assert base.run_name("v") == lm_cfg("storage.uri=/elsewhere").run_name("v")
    assert base.run_name("v") != lm_cfg("lm.grad_clip=0.5").run_name("v")


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 10, 0, "cosine") for s in range(11)]
    assert cos[0] == 1.0 and cos[10] == pytest.approx(0.1) and cos == sorted(cos, reverse=True)


def test_no_weight_decay_on_biases_and_norm_gains():
    model = GPT(GPTConfig.from_size("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.blocks[0].ln1.weight for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params(non_embedding=False)  # every parameter once, the tied one too


def test_peak_from_config_table():
    assert peak_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for("NVIDIA H100 PCIe", {"H100": 900.0}) == 756.0  # longest match wins
    assert peak_for("NVIDIA B200", {"B200": 2250.0}) == 2250.0  # a GPU added in config
    assert peak_for("cpu") is None and peak_for("cpu", override=1.0) == 1.0


def test_prefetcher_yields_in_order_and_raises_the_makers_error():
    def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 7:
            raise ValueError("bad batch 7")
        return torch.tensor([i]), torch.tensor([-i])

    for depth in (0, 2):
        got = [int(x) for x, _ in Prefetcher(make, 2, 7, "cpu", depth=depth)]
        assert got == [2, 3, 4, 5, 6]
        it = Prefetcher(make, 5, 9, "cpu", depth=depth)
        assert int(next(it)[0]) == 5
        with pytest.raises(ValueError, match="bad batch 7"):
            list(it)
        it.close()


def run_local(tmp_path, *overrides: str) -> tuple[dict, dict]:
    """The loop as a plain call; a rerun resumes from its last checkpoint in `tmp_path`."""
    cfg = lm_cfg("train.torch_threads=1", *overrides)
    out = lm_train_loop_per_worker(loop_config(cfg, "local").plain(),
                                   LocalSession(str(tmp_path), resume=True))
    return out, ckpt_io.load_state(tmp_path)["model"]


def test_local_loop_loss_falls_and_reports_throughput(tmp_path):
    out, _ = run_local(tmp_path)
    h = out["history"]
    assert [m["step"] for m in h] == [10, 20, 30, 40, 50, 60]
    assert [m["epochs_done"] for m in h if "val/loss" in m] == [1, 2, 3]
    # ln(512) = 6.24 at init; the stream's bigram table is learnt within 60 steps
    assert h[0]["train/loss"] > 5.0 and h[-1]["train/loss"] < 2.0 and h[-1]["val/loss"] < 2.0
    assert all(m["perf/tokens_per_s"] > 0 and m["perf/step_ms"] > 0 for m in h)
    assert all(m["perf/mfu"] is None and m["perf/gpu_mem_gib"] is None for m in h)  # CPU
    s = out["summary"]
    assert s["timed_steps"] == 55 and s["device"] == "cpu" and s["mfu_pct"] is None
    assert s["tokens_per_s"] == pytest.approx(16 * 64 / (s["step_ms"] / 1e3))
    assert s["flops_per_token"] == 895_488  # 6N + 12LTd of the tiny GPT


def test_grad_accumulation_trains_on_the_same_global_batch(tmp_path):
    one, w1 = run_local(tmp_path / "a", "train.epochs=1")
    four, w4 = run_local(tmp_path / "b", "train.epochs=1", "lm.grad_accum_steps=4")
    assert [m["train/loss"] for m in one["history"]] == pytest.approx(
        [m["train/loss"] for m in four["history"]], abs=1e-4)
    # Adam turns float-order noise in near-zero gradients into ~1e-4; other batches: ~0.1
    assert all(torch.allclose(w1[k], w4[k], atol=1e-3) for k in w1)


@pytest.mark.parametrize("crash_after,every_n_steps", [(1, 0), (2, 5)],
                         ids=["epoch-end", "mid-epoch"])
def test_crash_and_rerun_resumes_to_identical_weights(tmp_path, monkeypatch, crash_after,
                                                      every_n_steps):
    """A rerun continues from the last checkpoint (an epoch end, or mid-epoch with
    checkpoint.every_n_steps) and ends with the weights of a run never interrupted."""
    ov = ("train.epochs=2", f"checkpoint.every_n_steps={every_n_steps}")
    reference, w_ref = run_local(tmp_path / "ref", *ov)
    saved = []
    real = LocalSession.report

    def crashing(self, metrics, directory=None, name=None):
        real(self, metrics, directory, name)
        if directory:
            saved.append(metrics["step"])
            if len(saved) == crash_after:
                raise RuntimeError("worker lost")

    monkeypatch.setattr(LocalSession, "report", crashing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_local(tmp_path / "run", *ov)
    monkeypatch.setattr(LocalSession, "report", real)
    resumed, w = run_local(tmp_path / "run", *ov)
    assert resumed["restored_from"]["step"] == saved[-1] == (20 if crash_after == 1 else 10)
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)
    assert [m["train/loss"] for m in resumed["history"] if m["step"] > saved[-1]] == [
        m["train/loss"] for m in reference["history"] if m["step"] > saved[-1]]


def test_summary_lines_of_a_record(tmp_path):
    out, _ = run_local(tmp_path, "train.epochs=1")
    cfg = lm_cfg("train.epochs=1")
    record = {"run_name": "gpt_synthetic-x", "status": "finished", "config": cfg.plain(),
              "task": "lm",
              "history": out["history"], "summary": out["summary"], "world_size": 1,
              "final": out["history"][-1], "best": out["history"][-1],
              "checkpoints": {"latest": "file:///x"}, "run_uri": "file:///r", "wall_s": 1.0}
    text = "\n".join(summary_lines(record))
    assert "tiny: 0.13M params" in text and "1 worker(s), ddp, fp32, eager" in text
    assert "tokens/s" in text and "MFU - (no peak TFLOP/s known for cpu)" in text
    assert not math.isnan(record["final"]["val/loss"])
