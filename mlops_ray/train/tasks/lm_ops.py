"""Parts of the language-model loop that are not the loop: the peak-FLOP/s lookup, the LR
schedule, optimizer parameter groups, the batch prefetcher, cross-rank means, and FSDP2
sharding and full (unsharded) state dicts."""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mlops_ray.perf import PEAK_TFLOPS

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



def full_state_dicts(net: nn.Module, opt: Any, fsdp: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (unsharded) model and optimizer state; every rank calls it (FSDP gathers)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(net, options=o), get_optimizer_state_dict(net, opt, options=o)
    return net.state_dict(), opt.state_dict()


def load_full_state(net: nn.Module, opt: Any, st: dict[str, Any]) -> None:
    """A full checkpoint into an FSDP2-sharded model and its optimizer (every rank)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(net, st["model"], options=full)
    set_optimizer_state_dict(net, opt, st["optimizer"], options=full)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
