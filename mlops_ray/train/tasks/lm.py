"""The language-model task (`task: lm`): a GPT on the synthetic token stream, through the same
driver (TorchTrainer, run names, resume, failure handling, run.json, W&B) as any run.

One optimizer step is `train.batch_size` sequences over all workers, in `lm.grad_accum_steps`
micro-batches. The global batch of a step is a pure function of (seed, step) (SyntheticTokens),
split among ranks and micro-batches: a resumed run, at an epoch end or mid-epoch, trains on the
batches an uninterrupted one would, and neither the world size nor the accumulation changes them
(only the float summation order). In the loop, all from config (conf/lm/*.yaml):

* bf16 autocast, TF32, `torch.compile` (mode from config), fused AdamW (no decay on biases and
  LayerNorm gains), gradient accumulation (gradient sync on the last micro-batch only),
  gradient clipping, activation checkpointing per block;
* DDP through `ray.train.torch.prepare_model`, or FSDP2: `fully_shard` per block and the root
  (full, unsharded state dicts in checkpoints, gathered collectively);
* a background thread makes (and pins) batches ahead; copies to the GPU run on a side stream
  one micro-batch ahead, so neither sits between two steps;
* every `lm.log_every_n_steps` steps a report: train/loss, perf/tokens_per_s (all workers),
  perf/step_ms, perf/tflops and perf/mfu (per device, against the configured peak; None when
  it is unknown, e.g. CPU), perf/gpu_mem_gib; at epoch ends also val/loss on held-out batches,
  and a checkpoint on the checkpoint.* schedule (spot-safety is train/spot.py's).

The device is synchronised only where a number is read (the reports), never per step. run.json
adds `summary`: the steady-state throughput (the steps after lm.warmup_steps).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.config.base import Strict
from mlops_ray.config.lm import LmCfg, LmJob
from mlops_ray.config.train import EarlyStopCfg
from mlops_ray.models.synthetic import SyntheticTokens
from mlops_ray.perf import mfu
from mlops_ray.train import session as sessions
from mlops_ray.train.progress import lm_line
from mlops_ray.train.spot import EarlyStopping, Spot, seed_for
from mlops_ray.train.tasks import Task
from mlops_ray.train.tasks.lm_ops import (
    Batch,
    Prefetcher,
    full_state_dicts,
    load_full_state,
    lr_factor,
    mean_over_ranks,
    param_groups,
    peak_for,
    shard_fsdp,
    sync,
)
from mlops_ray.utils import build


class LmLoopCfg(Strict):
    """What every worker gets (a plain dict across Ray; validated again in the worker)."""
    run_name: str
    seed: int
    epochs: int
    batch_size: int
    precision: str
    lr_schedule: str
    early_stopping: EarlyStopCfg | None
    torch_threads: int
    use_gpu: bool
    model: dict[str, Any]
    optim: dict[str, Any]
    lm: LmCfg
    noise: float  # of the synthetic stream
    every_n_epochs: int
    every_n_steps: int
    preemption_check_every_n_steps: int
    preemption_grace_s: float
    score_attribute: str | None
    step_log: str | None = None  # test seams (train/spot.py, train/gate.py)
    step_gate: str | None = None


def loop_config(job: LmJob, run_name: str) -> LmLoopCfg:
    import os

    from mlops_ray.train.gate import from_env
    t, ck = job.train, job.checkpoint
    return LmLoopCfg(
        run_name=run_name, seed=job.seed, epochs=t.epochs, batch_size=t.batch_size,
        precision=t.precision, lr_schedule=t.lr_schedule, early_stopping=t.early_stopping,
        torch_threads=job.torch_threads(), use_gpu=job.scaling.use_gpu, model=job.model.spec(),
        optim=job.optim.spec(), lm=job.lm, noise=job.dataset.noise,
        every_n_epochs=ck.every_n_epochs, every_n_steps=ck.every_n_steps,
        preemption_check_every_n_steps=ck.preemption_check_every_n_steps,
        preemption_grace_s=job.failure.preemption_grace_s,
        score_attribute=ck.checkpoint_score_attribute,
        step_log=os.environ.get("MLOPS_RAY_STEP_LOG"), step_gate=from_env())


class LmLoop:
    """One rank of an LM run: set up (model, sharding, optimizer, restore), then `run()`."""

    def __init__(self, c: LmLoopCfg, session: Any):
        self.c, self.session, lm = c, session, c.lm
        self.rank, self.world = session.rank, session.world
        torch.set_num_threads(c.torch_threads)
        self.device = device = session.device(c.use_gpu)
        self.cuda = cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = bool(lm.tf32)
            torch.backends.cudnn.allow_tf32 = bool(lm.tf32)
            torch.cuda.reset_peak_memory_stats(device)
        self.amp = cuda and c.precision == "bf16"
        self.fsdp = lm.strategy == "fsdp"
        self.spe, self.accum = lm.steps_per_epoch, lm.grad_accum_steps
        self.total = c.epochs * self.spe
        es = c.early_stopping.model_dump() if c.early_stopping else None

        torch.manual_seed(c.seed)  # identical init on every rank
        # Any: the GPT's own attributes (cfg, flops_per_token) are not nn.Module's
        net: Any = build(c.model, checkpointing=lm.activation_checkpointing)
        net.to(device)
        self.net, self.block = net, net.cfg.block_size
        self.fpt, self.n_params = float(net.flops_per_token()), int(net.num_params())
        self.dropout = float(c.model.get("dropout") or 0.0)
        self.spot = Spot(session, c.run_name, every_n_epochs=c.every_n_epochs,
                         every_steps=c.every_n_steps,
                         preempt_every=c.preemption_check_every_n_steps,
                         grace_s=c.preemption_grace_s, step_log=c.step_log, step_gate=c.step_gate)
        st = self.spot.restore()
        if st is not None and not self.fsdp:
            net.load_state_dict(st["model"])
        self.model: Any = shard_fsdp(net) if self.fsdp else session.prepare(net, device)
        self.opt = build(c.optim)(param_groups(self.model, c.optim.get("weight_decay", 0.0)),
                                  **({"fused": True} if lm.fused_optimizer else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(
            s, self.total, lm.lr_warmup_steps, c.lr_schedule))
        self.stopper = EarlyStopping(es)
        self.step, self.history, self.restored_from = 0, [], None
        self.summary: dict[str, Any] | None = None
        self.stop = False  # a run that stopped early stays stopped when rerun
        if st is not None:
            if self.fsdp:
                load_full_state(net, self.opt, st)
            else:
                self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            self.step, self.history, self.summary = st["step"], st["history"], st.get("summary")
            self.stopper = EarlyStopping(es, st["early_stop"])
            self.stop = bool(st.get("stopped"))
            self.restored_from = {"step": self.step, "epoch": self.step // self.spe,
                                  "jit": self.spot.jit_restore}
        self.fwd = torch.compile(self.model, mode=lm.compile_mode) if lm.compile else self.model
        self.data = SyntheticTokens(net.cfg.vocab_size, self.block, seed=c.seed, noise=c.noise,
                                    pin_memory=cuda and lm.pin_memory)
        self.device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
        self.peak = peak_for(self.device_name, lm.peak_tflops, lm.peak_tflops_override)
        self.tokens_per_step = c.batch_size * self.block
        self.start = self.step
        self.steady_t0: float | None = self.now() if lm.warmup_steps == 0 else None
        self.peak_mem = 0.0
        self.loss_sum = torch.zeros((), device=device)
        self.win_steps, self.win_t0 = 0, time.perf_counter()

    # ------------------------------------------------------------------------- data
    def rows(self, step: int, m: int) -> Batch:
        """Micro-batch m of this rank at `step`: its rows of the global batch, split in `accum`
        parts; the global batch is the same for any number of workers and micro-batches."""
        return self.data.batch(step, self.c.batch_size, self.rank * self.accum + m,
                               self.world * self.accum)

    def host_batch(self, i: int) -> Batch:  # i counts micro-batches
        return self.rows(*divmod(i, self.accum))

    def val_loss(self) -> float:
        """Mean loss on held-out batches (negative steps: never trained on), over all ranks."""
        self.net.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.amp):
            losses = [self.net(*(t.to(self.device) for t in self.rows(-1 - i, m)))[1].float()
                      for i in range(self.c.lm.val_batches) for m in range(self.accum)]
        self.net.train()
        return float(mean_over_ranks(torch.stack(losses).mean()).item())

    def sync_grads(self, last: bool) -> Any:
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        no_sync = getattr(self.model, "no_sync", None)  # DDP
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    # ------------------------------------------------------------------------- metrics
    def now(self) -> float:
        """Wall time after the device has finished the work queued so far."""
        sync(self.device)
        return time.perf_counter()

    def mem_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def window(self) -> dict[str, Any]:
        """Metrics of the steps since the last report (reads the loss: a device sync)."""
        loss = float(mean_over_ranks(self.loss_sum / max(1, self.win_steps * self.accum)).item())
        now = time.perf_counter()
        dt = max(now - self.win_t0, 1e-9)
        tps = self.win_steps * self.tokens_per_step / dt
        mem = self.mem_gib()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_mem = max(self.peak_mem, mem or 0.0)
        out = {"step": self.step, "epoch": (self.step - 1) // self.spe,  # the epoch it is in
               "world_size": self.world, "train/loss": loss, "lr": self.sched.get_last_lr()[0],
               "perf/step_ms": dt / max(1, self.win_steps) * 1e3, "perf/tokens_per_s": tps,
               "perf/tflops": tps / self.world * self.fpt / 1e12,
               "perf/mfu": mfu(tps / self.world, self.fpt, self.peak), "perf/gpu_mem_gib": mem,
               "time/at": time.time()}
        self.loss_sum, self.win_steps, self.win_t0 = torch.zeros((), device=self.device), 0, now
        return out

    def summarise(self, t0: float, t1: float) -> dict[str, Any]:
        c, lm = self.c, self.c.lm
        n = self.step - self.start - lm.warmup_steps
        step_s = (t1 - t0) / n
        tps = self.tokens_per_step / step_s
        util = mfu(tps / self.world, self.fpt, self.peak)
        return {"timed_steps": n, "warmup_steps": lm.warmup_steps, "step_ms": step_s * 1e3,
                "tokens_per_s": tps, "tflops": tps / self.world * self.fpt / 1e12,
                "mfu_pct": None if util is None else 100 * util,
                "peak_mem_gib": max(self.peak_mem, self.mem_gib() or 0.0) if self.cuda else None,
                "device": self.device_name, "peak_tflops": self.peak, "world_size": self.world,
                "strategy": lm.strategy, "batch_size": c.batch_size, "seq_len": self.block,
                "params": self.n_params, "flops_per_token": self.fpt, "precision": c.precision,
                "compile": lm.compile_mode if lm.compile else None}

    def timed_enough(self) -> bool:
        return self.steady_t0 is not None and self.step - self.start > self.c.lm.warmup_steps

    # ------------------------------------------------------------------------- checkpoints
    def report(self, metrics: dict[str, Any], keep: bool, jit: bool = False) -> None:
        """All ranks call this (a barrier); rank 0 writes the checkpoint when `keep` (under
        FSDP every rank first takes part in gathering the full state)."""
        states = full_state_dicts(self.net, self.opt, self.fsdp) \
            if keep and (self.fsdp or self.rank == 0) else None
        epoch_no, in_epoch = divmod(self.step, self.spe)

        def write(folder: str) -> None:
            assert states is not None
            state = {"model": states[0], "optimizer": states[1],
                     "scheduler": self.sched.state_dict(), "step": self.step,
                     "history": self.history, "summary": self.summary,
                     "early_stop": self.stopper.state(), "stopped": self.stop,
                     **self.spot.bookkeeping(jit)}
            meta = {"task": "lm", "model": self.c.model, "run_name": self.c.run_name,
                    "epoch": epoch_no, "step": self.step, "metrics": metrics, "jit": jit}
            ckpt_io.save(folder, state, meta, {})  # an LM has no preprocessing: {}
        self.spot.report(metrics, keep, f"checkpoint_e{epoch_no:04d}_s{in_epoch:05d}", write,
                         epoch_no, in_epoch)

    # ------------------------------------------------------------------------- the loop
    def train_step(self, batches: Prefetcher) -> None:
        lm = self.c.lm
        for m in range(self.accum):
            x, y = next(batches)
            if self.dropout:
                torch.manual_seed(seed_for(self.c.seed, self.step, m, self.rank))  # resumable
            with self.sync_grads(m == self.accum - 1):
                if lm.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    _, loss = self.fwd(x, y)
                (loss / self.accum).backward()
            self.loss_sum = self.loss_sum + loss.detach()  # new tensor: CUDA graphs reuse outputs
        if lm.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), lm.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.win_steps += 1

    def run(self) -> dict[str, Any]:
        lm, spot = self.c.lm, self.spot
        batches = Prefetcher(self.host_batch, self.step * self.accum, self.total * self.accum,
                             self.device, lm.prefetch, self.cuda and lm.non_blocking)
        spot.log("start", self.step // self.spe, self.step % self.spe)
        try:
            while self.step < self.total and not self.stop:
                self.train_step(batches)
                step = self.step
                if step - self.start == lm.warmup_steps and self.steady_t0 is None:
                    self.steady_t0 = self.now()
                if step == self.total and self.timed_enough():
                    assert self.steady_t0 is not None
                    self.summary = self.summarise(self.steady_t0, self.now())
                epoch_end = step % self.spe == 0
                due = None if epoch_end else spot.between_steps(step // self.spe,
                                                                 step % self.spe, step)
                if not (epoch_end or due or step % lm.log_every_n_steps == 0):
                    continue
                metrics = self.window()
                if epoch_end:
                    metrics.update({"epochs_done": metrics["epoch"] + 1,
                                    "val/loss": self.val_loss()})
                    self.stop = self.stopper.update(metrics)
                    metrics["early_stopped"] = int(self.stop)
                elif due == "jit":  # scored by the loss of these very weights
                    metrics.update({"val/loss": self.val_loss(), "preempted": 1})
                self.history.append(metrics)
                hold = due == "jit"
                if epoch_end:
                    done = self.stop or step == self.total
                    keep, draining = spot.at_epoch_end(metrics["epoch"] + 1, done)
                    if self.stop and self.summary is None and self.timed_enough():
                        assert self.steady_t0 is not None
                        self.summary = self.summarise(self.steady_t0, self.now())
                    self.report(metrics, keep, jit=draining and not done)
                    hold = draining and not done
                elif due == "ckpt" and self.c.score_attribute \
                        and self.c.score_attribute not in metrics:
                    # a mid-epoch checkpoint has no val/loss: NaN ranks below every number
                    self.report({**metrics, self.c.score_attribute: math.nan, "mid_epoch": 1},
                                True)
                else:
                    self.report(metrics, due is not None, jit=due == "jit")
                if hold:  # once per drain; the drained node dies after its checkpoint
                    spot.hold()
        finally:
            batches.close()
            spot.close()
        return {"history": self.history, "summary": self.summary,
                "restored_from": self.restored_from, "stopped_early": self.stop,
                "preemptions_survived": spot.survived, "restarts": spot.restarts,
                "rank": self.rank, "world_size": self.world}


def lm_train_loop_per_worker(config: dict[str, Any], session: Any = None) -> dict[str, Any]:
    """One rank of an LM run. `session`: where it runs (default: a Ray Train worker)."""
    return LmLoop(LmLoopCfg.model_validate(config), session or sessions.TrainSession()).run()


# ------------------------------------------------------------------------------- driver side
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_lines(record: dict[str, Any]) -> list[str]:
    s, h = record.get("summary") or {}, record.get("history") or []
    final, best = record.get("final") or {}, record.get("best") or {}
    cfg = record["config"]
    lines = [
        f"model      {cfg['model']['size']}"
        + (f": {s['params'] / 1e6:.2f}M params, {s['flops_per_token'] / 1e9:.4g} GFLOP/token, "
           f"seq {s['seq_len']}" if s else "")
        + f"; {record.get('world_size')} worker(s), {cfg['lm']['strategy']}, "
        f"{cfg['train']['precision']}" + (f", compile:{cfg['lm']['compile_mode']}"
                                          if cfg["lm"]["compile"] else ", eager"),
        f"loss       train {_fmt(h[0]['train/loss'] if h else None, '.3f')} -> "
        f"{_fmt(final.get('train/loss'), '.3f')}, val {_fmt(final.get('val/loss'), '.3f')} "
        f"at step {final.get('step')}; best val/loss {_fmt(best.get('val/loss'), '.3f')}",
    ]
    if s:
        util = (f"MFU {s['mfu_pct']:.1f}% of {s['peak_tflops']:g}" if s.get("mfu_pct") is not None
                else "MFU - (no peak TFLOP/s known")
        lines.append(
            f"throughput {s['tokens_per_s']:,.0f} tokens/s, {s['step_ms']:.1f} ms/step over "
            f"{s['timed_steps']} steps after {s['warmup_steps']} warm-up; per device "
            f"{s['tflops']:.3g} TFLOP/s, {util} for {s['device']})"
            + (f", peak mem {s['peak_mem_gib']:.2f} GiB" if s.get("peak_mem_gib") is not None
               else ""))
    lines.append(f"checkpoint {record.get('checkpoints', {}).get('latest')}")
    return lines


def make(job: LmJob) -> Task:
    """No data preparation: the token stream is synthetic and made on the workers."""
    version = job.data_version()
    return Task(name="lm", loop=lm_train_loop_per_worker,
                loop_config=lambda run_name: loop_config(job, run_name).plain(),
                data_version=version, dataset={**job.dataset.plain(), "version": version},
                progress=lm_line, summary=summary_lines, record={"task": "lm"},
                step_key="step")
