"""The per-worker loop of a language-model run (`task: lm`), run by the same TorchTrainer as the
tabular loop (trainer.trainer_for) and reusing its sessions.

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
  it is unknown, e.g. CPU), perf/gpu_mem_gib (peak allocated since the last report; None on
  CPU); at epoch ends also val/loss on held-out batches, and a checkpoint on the checkpoint.*
  schedule (a just-in-time one when a node drains, as in loop.py).

The device is synchronised only where a number is read (the reports), never per step.
"""
from __future__ import annotations

import contextlib
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlops_ray.models.synthetic import SyntheticTokens
from mlops_ray.perf import PEAK_TFLOPS, mfu
from mlops_ray.train import checkpoint as ckpt_io
from mlops_ray.train.gate import StepGate
from mlops_ray.train.loop import EarlyStopping, _LocalSession, _seed_for, _TrainSession
from mlops_ray.utils import build

Batch = tuple[torch.Tensor, torch.Tensor]


def peak_for(device_name: str, table: dict[str, float] | None = None,
             override: float | None = None) -> float | None:
    """Peak TFLOP/s of a device by name: the override, else the longest key of `table` merged
    over mlops_ray.perf.PEAK_TFLOPS that is a substring of the name; None when none is."""
    if override is not None:
        return override
    merged = {**PEAK_TFLOPS, **(table or {})}
    hits = [k for k in merged if k.lower() in device_name.lower()]
    return merged[max(hits, key=len)] if hits else None


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warm-up over
    `warmup` steps, then constant or cosine down to 10% of the base at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """GPT-2 practice: decay matrices (and embeddings), not biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Prefetcher:
    """Micro-batches `make(i)` for i in [start, stop), in order.

    With depth > 0 a daemon thread makes them `depth` ahead (synthetic generation and pinning
    stay off the training thread). Each is copied to `device` one micro-batch before it is
    used; on CUDA with non_blocking the copy runs on a side stream from pinned memory and the
    compute stream waits for it only when the batch is taken, so the copy overlaps a step.
    """

    def __init__(self, make: Callable[[int], Batch], start: int, stop: int,
                 device: torch.device | str, depth: int = 2, non_blocking: bool = True):
        self.make, self.device, self.non_blocking = make, torch.device(device), non_blocking
        self.left = max(0, stop - start)
        self.stream = torch.cuda.Stream(self.device) \
            if self.device.type == "cuda" and non_blocking else None
        self._closed = threading.Event()
        self._queue: queue.Queue[Batch | BaseException] | None = None
        self._indices = iter(range(start, stop))
        if depth > 0 and self.left:
            self._queue = queue.Queue(maxsize=depth)
            threading.Thread(target=self._fill, args=(start, stop), daemon=True,
                             name="lm-prefetch").start()
        self._next = self._copy(self._host())

    def _fill(self, start: int, stop: int) -> None:
        assert self._queue is not None
        for i in range(start, stop):
            item: Batch | BaseException
            try:
                item = self.make(i)
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                item = e
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._closed.is_set() or isinstance(item, BaseException):
                return

    def _host(self) -> Batch | None:
        if self.left == 0:
            return None
        self.left -= 1
        if self._queue is None:
            return self.make(next(self._indices))
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _copy(self, batch: Batch | None) -> Batch | None:
        if batch is None:
            return None
        if self.stream is None:
            x, y = (t.to(self.device, non_blocking=self.non_blocking) for t in batch)
            return x, y
        with torch.cuda.stream(self.stream):
            x, y = (t.to(self.device, non_blocking=True) for t in batch)
        return x, y

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        cur = self._next
        if cur is None:
            raise StopIteration
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            for t in cur:  # memory made on the side stream, freed after the compute uses it
                t.record_stream(compute)
        self._next = self._copy(self._host())
        return cur

    def close(self) -> None:
        self._closed.set()


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself without a process group)."""
    if _world() == 1:
        return t
    t = t.detach().clone()
    torch.distributed.all_reduce(t)
    return t / _world()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shard_fsdp(net: nn.Module) -> nn.Module:
    """FSDP2: shard each transformer block, then the root (embeddings, tied head, final norm).
    `fully_shard` changes `net` in place: its parameters become DTensors."""
    from torch.distributed.fsdp import fully_shard
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("lm.strategy=fsdp needs a process group (run it under Ray Train)")
    for block in getattr(net, "blocks", []):
        fully_shard(block)
    fully_shard(net)
    return net


class _DirCheckpoint:
    """A local checkpoint folder with Ray's Checkpoint.as_directory interface."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


class _LocalLMSession(_LocalSession):
    """No Ray: a plain call (tests, notebooks). Keeps the last checkpoint in `local_dir` and
    resumes from it, as a rerun of a Ray Train run resumes from its latest checkpoint."""

    def get_checkpoint(self) -> Any:
        if self.local_dir and (Path(self.local_dir) / "state.pt").exists():
            return _DirCheckpoint(self.local_dir)
        return None


def lm_train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    session: _TrainSession = (_LocalLMSession(config.get("local_dir"))
                              if config.get("session") == "local" else _TrainSession())
    rank, world = session.rank, session.world
    lm, seed = config["lm"], config["seed"]
    torch.set_num_threads(config["torch_threads"])
    device = session.device(config["use_gpu"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = bool(lm["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(lm["tf32"])
        torch.cuda.reset_peak_memory_stats(device)
    amp = cuda and config["precision"] == "bf16"
    fsdp = lm["strategy"] == "fsdp"

    torch.manual_seed(seed)  # identical init on every rank
    # Any: the GPT's own attributes (cfg, flops_per_token) are not nn.Module's
    net: Any = build(config["model"], checkpointing=lm["activation_checkpointing"])
    net.to(device)
    vocab, block = net.cfg.vocab_size, net.cfg.block_size
    fpt = float(net.flops_per_token())
    n_params = int(net.num_params())
    dropout = float(config["model"].get("dropout") or 0.0)

    st = None
    if (ckpt := session.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            st = ckpt_io.load_state(d)
        if not fsdp:
            net.load_state_dict(st["model"])
    model = shard_fsdp(net) if fsdp else session.prepare(net, device)
    opt = build(config["optim"])(param_groups(model, config["optim"].get("weight_decay", 0.0)),
                                 **({"fused": True} if lm["fused_optimizer"] else {}))
    epochs, spe, accum = config["epochs"], lm["steps_per_epoch"], lm["grad_accum_steps"]
    total = epochs * spe
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, total, lm["lr_warmup_steps"], config["lr_schedule"]))
    stopper = EarlyStopping(config["early_stopping"])
    step, history, restored_from, survived, restarts = 0, [], None, 0, 0
    summary: dict[str, Any] | None = None
    stopped = False
    if st is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(net, st["model"], options=full)
            set_optimizer_state_dict(net, opt, st["optimizer"], options=full)
        else:
            opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, history, summary = st["step"], st["history"], st.get("summary")
        stopper = EarlyStopping(config["early_stopping"], st["early_stop"])
        stopped = bool(st.get("stopped"))
        survived = st.get("preemptions_survived", 0) + bool(st.get("jit"))
        restarts = st.get("restarts", 0) + 1
        restored_from = {"step": step, "epoch": step // spe, "jit": bool(st.get("jit"))}
    fwd = torch.compile(model, mode=lm["compile_mode"]) if lm["compile"] else model

    data = SyntheticTokens(vocab, block, seed=seed, noise=config["dataset"]["noise"],
                           pin_memory=cuda and lm["pin_memory"])

    def rows(step: int, m: int) -> Batch:
        """Micro-batch m of this rank at `step`: its rows of the global batch, split in `accum`
        parts; the global batch is the same for any number of workers and micro-batches."""
        return data.batch(step, config["batch_size"], rank * accum + m, world * accum)

    def host_batch(i: int) -> Batch:  # i counts micro-batches
        return rows(*divmod(i, accum))

    def val_loss() -> float:
        """Mean loss on held-out batches (negative steps: never trained on), over all ranks."""
        net.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = [net(*(t.to(device) for t in rows(-1 - i, m)))[1].float()
                      for i in range(lm["val_batches"]) for m in range(accum)]
        net.train()
        return float(mean_over_ranks(torch.stack(losses).mean()).item())

    def sync_grads(last: bool) -> Any:
        if fsdp:
            model.set_requires_gradient_sync(last)  # type: ignore[operator]
            return contextlib.nullcontext()
        no_sync = getattr(model, "no_sync", None)  # DDP
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def state_dicts() -> tuple[dict[str, Any], dict[str, Any]]:
        """Full (unsharded) model and optimizer state; every rank calls it (FSDP gathers)."""
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )
            o = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(net, options=o), get_optimizer_state_dict(net, opt,
                                                                                  options=o)
        return net.state_dict(), opt.state_dict()

    def save_and_report(metrics: dict[str, Any], keep: bool, jit: bool = False) -> None:
        """All ranks call this (a barrier); rank 0 attaches a checkpoint when `keep`."""
        if not keep:
            session.report(metrics)
            return
        if not fsdp and rank != 0:
            session.report(metrics)
            return
        model_sd, opt_sd = state_dicts()  # FSDP: a collective, on every rank
        if rank != 0:
            session.report(metrics)
            return
        state = {"model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                 "step": step, "history": history, "summary": summary,
                 "early_stop": stopper.state(), "stopped": stop, "jit": jit,
                 "preemptions_survived": survived, "restarts": restarts}
        epoch_no, in_epoch = divmod(step, spe)
        meta = {"task": "lm", "model": config["model"], "run_name": config["run_name"],
                "epoch": epoch_no, "step": step, "metrics": metrics, "jit": jit}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_io.save(tmp, state, meta, {})  # an LM has no preprocessing: {}
            session.report(metrics, tmp, f"checkpoint_e{epoch_no:04d}_s{in_epoch:05d}")

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_for(name, lm["peak_tflops"], lm["peak_tflops_override"])
    tokens_per_step = config["batch_size"] * block
    log_every, warmup = lm["log_every_n_steps"], lm["warmup_steps"]
    every_steps = config.get("every_n_steps", 0)
    preempt_every = config.get("preemption_check_every_n_steps", 0)
    score_attr = config.get("score_attribute")
    start = step
    steady_t0: float | None = _now(device) if warmup == 0 else None
    peak_mem = 0.0
    loss_sum = torch.zeros((), device=device)
    win_steps, win_t0 = 0, time.perf_counter()
    stop, drained = stopped, False
    gate = StepGate(config.get("step_gate"), config["run_name"], rank, world)

    def mem_gib() -> float | None:
        return torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    def window() -> dict[str, Any]:
        """Metrics of the steps since the last report (reads the loss: a device sync)."""
        nonlocal loss_sum, win_steps, win_t0, peak_mem
        loss = float(mean_over_ranks(loss_sum / max(1, win_steps * accum)).item())
        now = time.perf_counter()
        dt = max(now - win_t0, 1e-9)
        tps = win_steps * tokens_per_step / dt
        mem = mem_gib()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            peak_mem = max(peak_mem, mem or 0.0)
        out = {"step": step, "epoch": (step - 1) // spe,  # the epoch this step is in
               "world_size": world, "train/loss": loss, "lr": sched.get_last_lr()[0],
               "perf/step_ms": dt / max(1, win_steps) * 1e3, "perf/tokens_per_s": tps,
               "perf/tflops": tps / world * fpt / 1e12,
               "perf/mfu": mfu(tps / world, fpt, peak), "perf/gpu_mem_gib": mem,
               "time/at": time.time()}
        loss_sum, win_steps, win_t0 = torch.zeros((), device=device), 0, now
        return out

    def summarise(t0: float, t1: float) -> dict[str, Any]:
        n = step - start - warmup
        step_s = (t1 - t0) / n
        tps = tokens_per_step / step_s
        util = mfu(tps / world, fpt, peak)
        return {"timed_steps": n, "warmup_steps": warmup, "step_ms": step_s * 1e3,
                "tokens_per_s": tps, "tflops": tps / world * fpt / 1e12,
                "mfu_pct": None if util is None else 100 * util,
                "peak_mem_gib": max(peak_mem, mem_gib() or 0.0) if cuda else None,
                "device": name, "peak_tflops": peak, "world_size": world,
                "strategy": lm["strategy"], "batch_size": config["batch_size"], "seq_len": block,
                "params": n_params, "flops_per_token": fpt, "precision": config["precision"],
                "compile": lm["compile_mode"] if lm["compile"] else None}

    batches = Prefetcher(host_batch, step * accum, total * accum, device, lm["prefetch"],
                         cuda and lm["non_blocking"])
    try:
        while step < total and not stop:
            for m in range(accum):
                x, y = next(batches)
                if dropout:
                    torch.manual_seed(_seed_for(seed, step, m, rank))  # resumable masks
                with sync_grads(m == accum - 1):
                    if lm["compile"]:
                        torch.compiler.cudagraph_mark_step_begin()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        _, loss = fwd(x, y)
                    (loss / accum).backward()
                loss_sum = loss_sum + loss.detach()  # a new tensor: CUDA-graph outputs get reused
            if lm["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), lm["grad_clip"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            win_steps += 1
            if step - start == warmup and steady_t0 is None:
                steady_t0 = _now(device)
            if step == total and steady_t0 is not None and step - start > warmup:
                summary = summarise(steady_t0, _now(device))
            epoch_end = step % spe == 0
            held_into_drain = not epoch_end and gate.hold(step // spe, step % spe,
                                                          session.preempted)  # gate.py
            # get_preemption_info() is a barrier: every rank asks at the same steps
            jit = not epoch_end and not drained and (held_into_drain or bool(preempt_every)
                                                     and step % preempt_every == 0
                                                     and session.preempted())
            mid_ckpt = bool(every_steps) and step % every_steps == 0 and not epoch_end \
                and not jit
            if not (epoch_end or jit or mid_ckpt or step % log_every == 0):
                continue
            metrics = window()
            if epoch_end:
                metrics.update({"epochs_done": metrics["epoch"] + 1, "val/loss": val_loss()})
                stop = stopper.update(metrics)
                metrics["early_stopped"] = int(stop)
            elif jit:  # scored by the loss of these very weights
                metrics.update({"val/loss": val_loss(), "preempted": 1})
            history.append(metrics)
            hold = jit
            if epoch_end:
                done = stop or step == total
                draining = session.preempted() and not drained
                keep = done or (metrics["epoch"] + 1) % config["every_n_epochs"] == 0 \
                    or draining
                if stop and summary is None and steady_t0 is not None \
                        and step - start > warmup:
                    summary = summarise(steady_t0, _now(device))
                save_and_report(metrics, keep, jit=draining and not done)
                hold = draining and not done
            elif mid_ckpt and score_attr and score_attr not in metrics:
                # a mid-epoch checkpoint has no val/loss: NaN ranks below every number in Ray
                save_and_report({**metrics, score_attr: math.nan, "mid_epoch": 1}, True)
            else:
                save_and_report(metrics, jit or mid_ckpt, jit=jit)
            if hold:
                drained = True  # once per drain; the drained node dies after its checkpoint
                session.hold(config.get("preemption_grace_s", 0.0))
    finally:
        batches.close()
    return {"history": history, "summary": summary, "restored_from": restored_from,
            "stopped_early": stop, "preemptions_survived": survived, "restarts": restarts,
            "rank": rank, "world_size": world}


def _now(device: torch.device) -> float:
    """Wall time after the device has finished the work queued so far."""
    _sync(device)
    return time.perf_counter()
