"""GPT model, synthetic tokens, perf helpers and the bare bench arm (CPU; one GPU-only test)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mlops_ray.models.gpt import GPT, GPTConfig
from mlops_ray.models.synthetic import SyntheticTokens
from mlops_ray.perf import StepTimer, mfu, peak_tflops

TINY = GPTConfig.from_size("tiny")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny matmuls gain nothing from a second thread, and on a busy 2-core runner OpenMP
    # oversubscription made the training test >10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _closed_form_params(c: GPTConfig) -> int:
    """Non-position-embedding parameters of a biased GPT: per block 12d^2 + 13d, plus the tied
    (V, d) embedding and the final LayerNorm."""
    d = c.n_embd
    return c.n_layer * (12 * d * d + 13 * d) + c.vocab_size * d + 2 * d


def test_forward_shape_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = torch.randint(TINY.vocab_size, (2, 3, TINY.block_size))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, TINY.block_size, TINY.vocab_size)
    assert loss.shape == ()
    # GPT-2 init gives near-uniform predictions: loss close to ln(vocab).
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.3
    assert model(idx[:, :10])[1] is None
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_causal_masking():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(TINY.vocab_size, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_weight_tying_and_param_count():
    model = GPT(TINY)
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == _closed_form_params(TINY) == 132_864
    assert model.num_params(non_embedding=False) == 132_864 + TINY.block_size * TINY.n_embd


def test_flops_per_token_formula():
    model = GPT(TINY)
    # 6N + 12 L T d = 6 * 132864 + 12 * 2 * 64 * 64
    assert model.flops_per_token() == 895_488
    # gpt_small on the meta device (no memory, no init cost): the known 123.69M of GPT-2 124M.
    cfg = GPTConfig.from_size("gpt_small")
    with torch.device("meta"):
        small = GPT(cfg)
    assert small.num_params() == _closed_form_params(cfg) == 123_689_472
    assert small.flops_per_token() == 6 * 123_689_472 + 12 * 12 * 1024 * 768


def test_activation_checkpointing_gives_same_grads():
    idx = torch.randint(TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_size("tiny", checkpointing=ckpt))
        model(idx, idx)[1].backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_synthetic_batches_deterministic_and_rank_distinct():
    data = SyntheticTokens(TINY.vocab_size, TINY.block_size, seed=7)
    x, y = data.batch(step=3, batch_size=8)
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (8, TINY.block_size)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    # A pure function of (seed, step, rank): same across calls and across instances.
    again = SyntheticTokens(TINY.vocab_size, TINY.block_size, seed=7).batch(3, 8)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, data.batch(4, 8)[0])
    other_seed = SyntheticTokens(TINY.vocab_size, TINY.block_size, seed=8)
    assert not torch.equal(x, other_seed.batch(3, 8)[0])
    r0, r1 = data.batch(3, 8, rank=0, world_size=2), data.batch(3, 8, rank=1, world_size=2)
    assert r0[0].shape == (4, TINY.block_size) and not torch.equal(r0[0], r1[0])
    # The ranks' rows tile the world_size=1 batch: resuming on a different world size is exact.
    assert torch.equal(torch.cat([r0[0], r1[0]]), x)
    with pytest.raises(ValueError):
        data.batch(0, 7, rank=0, world_size=2)


def test_loss_falls_on_tiny():
    torch.manual_seed(0)
    model = GPT(TINY)
    data = SyntheticTokens(TINY.vocab_size, TINY.block_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        _, loss = model(*data.batch(step, 16))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # ln(512) = 6.24 at init; the stream's bigram structure is learnable well below that.
    assert losses[0] > 6.0
    assert sum(losses[-3:]) / 3 < losses[0] - 2.0, losses


def test_peak_tflops_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA L40S") == 362.0  # not the L4's 121
    assert peak_tflops("cpu") is None and peak_tflops("Some New GPU") is None
    assert peak_tflops("cpu", override=50.0) == 50.0
    assert mfu(1e6, 1e6, 100.0) == pytest.approx(0.01)
    assert mfu(1e6, 1e6, None) is None


def test_step_timer_skips_warmup():
    timer = StepTimer(warmup=2)
    for _ in range(5):
        timer.step()
    assert timer.stop() >= 0 and timer.timed_steps == 3
    with pytest.raises(RuntimeError, match="no steps after warm-up"):
        StepTimer(warmup=3).stop()


def test_bench_run_bare_smoke():
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("gpu_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.run_bare(TINY, batch=4, steps=4, warmup=1, compile=False, dtype="fp32",
                         device="cpu")
    assert row["timed_steps"] == 3 and row["step_ms"] > 0 and row["mfu_pct"] is None
    assert row["tokens_per_s"] == pytest.approx(4 * TINY.block_size / (row["step_ms"] / 1e3))
    assert "bare eager fp32" in bench.format_table([row])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_forward_on_gpu():
    torch.manual_seed(0)
    model = GPT(TINY).cuda()
    x, y = (t.cuda() for t in SyntheticTokens(TINY.vocab_size, TINY.block_size).batch(0, 4))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(x, y)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert model.wte.weight.grad.dtype == torch.float32
