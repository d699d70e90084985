"""GPT training throughput on one device: (a) a bare PyTorch loop, eager and compiled, and (b)
the same model and batch through `jobs.train`'s machinery (Ray Train, 1 worker, the LM loop of
`+experiment=gpt_synthetic`), in one run; prints the ratio (b)/(a) of tokens/s.

    .venv/bin/python bench/gpu_train.py                 # GPU: gpt_small, batch 16, compiled, bf16
    .venv/bin/python bench/gpu_train.py --size gpt_small --batch-size 16 --steps 50 --warmup 10 \
        --compile --compile-mode default --dtype bf16
    .venv/bin/python bench/gpu_train.py --arms bare     # (a) only, as before (b) existed

On a CPU-only machine the defaults become a smoke test (tiny, batch 8, 20 steps, eager, fp32;
arm (b) starts a local Ray: run it under `flock /tmp/mlops-ray.lock` where Ray tests share it).
Output: one header line, then one row per variant; step ms is the mean over the steps after
warm-up, TFLOP/s and MFU use 6N + 12LTd FLOPs per token against the device's dense bf16 peak
(`mlops_ray.perf.PEAK_TFLOPS`; arm (b): conf/lm `peak_tflops`, the same figures), and loss is
first -> last step (it should fall; arm (b): the means of its first and last report windows,
`lm.log_every_n_steps` = 10 steps). Arm (b) does what (a) does per step (no gradient clipping,
constant LR, AdamW fused on GPU, TF32, pinned asynchronous copies) plus the job's reports every
10 steps; Ray's start-up and the final validation and checkpoint are outside its timed window.
For example (one H200, torch 2.11, `--size gpt_small --steps 40 --warmup 10 --compile
--batch-size 32 --arms bare`):

    device: NVIDIA H200 (peak bf16 989 TFLOP/s) | gpt_small: 123.69M params, 0.8554 GFLOP/token, seq 1024
    variant                    batch  step ms  tokens/s  TFLOP/s  MFU %  peak mem GiB  loss
    bare compile:default bf16     32     67.5   485,692      415   42.0         21.28  10.98 -> 10.04
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from mlops_ray.models.gpt import GPT, SIZES, GPTConfig  # noqa: E402
from mlops_ray.models.synthetic import SyntheticTokens, to_device  # noqa: E402
from mlops_ray.perf import StepTimer, mfu, peak_tflops  # noqa: E402


def variant_name(arm: str, compile: bool, compile_mode: str, dtype: str, cfg: GPTConfig) -> str:
    name = f"{arm} {'compile:' + compile_mode if compile else 'eager'} {dtype}"
    return name + " ckpt" if cfg.checkpointing else name


def run_bare(model_cfg: GPTConfig, batch: int, steps: int, warmup: int, compile: bool,
             compile_mode: str = "default", dtype: str = "bf16",
             device: torch.device | str | None = None, lr: float = 6e-4, seed: int = 0,
             peak_tflops_override: float | None = None) -> dict[str, Any]:
    """Train `steps` steps (the first `warmup` untimed) of a fresh GPT on synthetic tokens."""
    if steps <= warmup:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup})")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    # TF32 for whatever fp32 matmuls remain (all of them with --dtype fp32); no-op on CPU.
    torch.set_float32_matmul_precision("high")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    model = GPT(model_cfg).to(device)
    # GPT-2 practice: decay matrices only, not biases or LayerNorm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=cuda)
    fwd = torch.compile(model, mode=compile_mode) if compile else model
    data = SyntheticTokens(model_cfg.vocab_size, model_cfg.block_size, seed=seed, pin_memory=cuda)

    timer = StepTimer(warmup, device)
    first_loss = last_loss = None
    for step in range(steps):
        x, y = to_device(data.batch(step, batch), device)
        if compile:
            torch.compiler.cudagraph_mark_step_begin()  # lets mode="reduce-overhead" reuse graphs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # Keep device tensors (no .item(): it would sync every step); clone because CUDA-graph
        # outputs are overwritten by the next replay.
        last_loss = loss.detach().clone()
        if first_loss is None:
            first_loss = last_loss
        timer.step()
    step_s = timer.stop()

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(name, peak_tflops_override)
    tokens_per_s = batch * model_cfg.block_size / step_s
    fpt = model.flops_per_token()
    util = mfu(tokens_per_s, fpt, peak)
    return {
        "variant": variant_name("bare", compile, compile_mode, dtype, model_cfg),
        "batch": batch, "seq_len": model_cfg.block_size, "timed_steps": timer.timed_steps,
        "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * fpt / 1e12, "mfu_pct": None if util is None else 100 * util,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "loss_first": first_loss.item(), "loss_last": last_loss.item(),
        "device": name, "peak_tflops": peak, "params": model.num_params(),
        "flops_per_token": fpt,
    }


def run_jobs_train(size: str, batch: int, steps: int, warmup: int, compile: bool,
                   compile_mode: str = "default", dtype: str = "bf16", checkpointing: bool = False,
                   peak_tflops_override: float | None = None, strategy: str = "ddp",
                   cpu_threads: int = 1, ray_address: str | None = None,
                   lr: float = 6e-4) -> dict[str, Any]:
    """Arm (b): `+experiment=gpt_synthetic` through mlops_ray.train.driver.run_training
    (TorchTrainer, 1 worker) with the bare arm's model, batch, optimizer and step count; the
    row has run_bare's keys. Runs in a temporary storage folder, tracking off."""
    from mlops_ray.config.compose import job
    from mlops_ray.config.lm import LmJob
    from mlops_ray.train.driver import run_training
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu_train-") as store:
        overrides = [
            "+experiment=gpt_synthetic", f"model.size={size}", f"train.batch_size={batch}",
            "train.epochs=1", f"lm.steps_per_epoch={steps}", f"lm.warmup_steps={warmup}",
            f"train.precision={dtype}", f"lm.compile={compile}",
            f"lm.activation_checkpointing={checkpointing}", f"lm.strategy={strategy}",
            f"lm.fused_optimizer={cuda}", "lm.grad_clip=0", "lm.lr_warmup_steps=0",
            "train.lr_schedule=constant", f"optim.lr={lr}", "checkpoint.num_to_keep=1",
            "tracking=none", f"storage.uri={store}", "ray.include_dashboard=false",
            "scaling=gpu" if cuda else f"train.torch_threads={cpu_threads}"]
        if compile:
            overrides.append(f"lm.compile_mode={compile_mode}")
        if peak_tflops_override is not None:
            overrides.append(f"lm.peak_tflops_override={peak_tflops_override}")
        if ray_address:
            overrides.append(f"ray.address={ray_address}")
        rec = run_training(job("train", LmJob, overrides), log=lambda _: None)
    s, h = rec["summary"], rec["history"]
    return {
        "variant": variant_name("jobs.train", compile, compile_mode, dtype,
                                GPTConfig.from_size(size, checkpointing=checkpointing)),
        "batch": batch, "seq_len": s["seq_len"], "timed_steps": s["timed_steps"],
        "step_ms": s["step_ms"], "tokens_per_s": s["tokens_per_s"], "tflops": s["tflops"],
        "mfu_pct": s["mfu_pct"], "peak_mem_gib": s["peak_mem_gib"],
        "loss_first": h[0]["train/loss"], "loss_last": h[-1]["train/loss"],
        "device": s["device"], "peak_tflops": s["peak_tflops"], "params": s["params"],
        "flops_per_token": s["flops_per_token"], "run_name": rec["run_name"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The bench table; rows are `run_bare`-shaped dicts (other arms return the same keys)."""
    def opt(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    w = max(len("variant"), *(len(r["variant"]) for r in rows))
    lines = [f"{'variant':<{w}}  batch  step ms  tokens/s  TFLOP/s  MFU %  peak mem GiB  loss"]
    for r in rows:
        lines.append(f"{r['variant']:<{w}}  {r['batch']:>5}  {r['step_ms']:>7.1f}  "
                     f"{r['tokens_per_s']:>8,.0f}  {r['tflops']:>7.3g}  "
                     f"{opt(r['mfu_pct'], '.1f'):>5}  {opt(r['peak_mem_gib'], '.2f'):>12}  "
                     f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="gpt_small" if cuda else "tiny")
    p.add_argument("--batch-size", type=int, default=16 if cuda else 8)
    p.add_argument("--steps", type=int, default=50 if cuda else 20,
                   help="total steps, warm-up included")
    p.add_argument("--warmup", type=int, default=10 if cuda else 5,
                   help="untimed first steps (compilation, allocator warm-up)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing per block")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="override the device's peak TFLOP/s used for MFU")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads without a GPU (the tiny smoke test gains nothing from more,"
                        " and loses >10x to oversubscription on a busy machine)")
    p.add_argument("--arms", default="bare,jobs",
                   help="comma-separated: bare (a, a bare PyTorch loop), jobs (b, jobs.train)")
    p.add_argument("--eager-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="with --compile, also run the bare loop eager (default: on)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="arm (b): lm.strategy (1 worker: fsdp shards nothing)")
    p.add_argument("--ray-address", default=None,
                   help="arm (b): join this Ray cluster instead of starting a local one")
    args = p.parse_args(argv)
    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    if not arms or arms - {"bare", "jobs"}:
        p.error(f"--arms={args.arms!r}: a comma-separated subset of bare,jobs")
    if not cuda:
        torch.set_num_threads(args.cpu_threads)

    cfg = GPTConfig.from_size(args.size, checkpointing=args.checkpointing)
    rows: list[dict[str, Any]] = []
    if "bare" in arms:
        if args.compile and args.eager_baseline is not False:
            rows.append(run_bare(cfg, args.batch_size, args.steps, args.warmup, False,
                                 dtype=args.dtype, peak_tflops_override=args.peak_tflops))
        rows.append(run_bare(cfg, args.batch_size, args.steps, args.warmup, args.compile,
                             compile_mode=args.compile_mode, dtype=args.dtype,
                             peak_tflops_override=args.peak_tflops))
        if cuda:  # hand the cached blocks back before the Ray worker allocates its own
            gc.collect()
            torch.cuda.empty_cache()
    if "jobs" in arms:
        rows.append(run_jobs_train(args.size, args.batch_size, args.steps, args.warmup,
                                   args.compile, compile_mode=args.compile_mode, dtype=args.dtype,
                                   checkpointing=args.checkpointing,
                                   peak_tflops_override=args.peak_tflops,
                                   strategy=args.strategy, cpu_threads=args.cpu_threads,
                                   ray_address=args.ray_address))
    row = rows[0]
    peak = f"peak bf16 {row['peak_tflops']:g} TFLOP/s" if row["peak_tflops"] else "peak unknown"
    print(f"device: {row['device']} ({peak}) | {args.size}: {row['params'] / 1e6:.2f}M params, "
          f"{row['flops_per_token'] / 1e9:.4g} GFLOP/token, seq {cfg.block_size}")
    print(format_table(rows))
    if {"bare", "jobs"} <= arms:
        print(ratio_line(rows[-2], rows[-1]))


def ratio_line(bare: dict[str, Any], jobs: dict[str, Any]) -> str:
    """(b)/(a) for the same compile setting and dtype: tokens/s and step time."""
    return (f"ratio (b)/(a): tokens/s {jobs['tokens_per_s'] / bare['tokens_per_s']:.3f}x, "
            f"step ms {jobs['step_ms'] / bare['step_ms']:.3f}x "
            f"({jobs['variant']} vs {bare['variant']})")


if __name__ == "__main__":
    main()
