"""Throughput helpers: peak FLOP/s per accelerator, MFU and steady-state step timing (no Ray)."""
from __future__ import annotations

import time

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, per vendor datasheets. Keys match a
# substring of torch.cuda.get_device_name(); the longest match wins, so "L40S" is not read as "L4"
# and "H100 PCIe" is not read as the SXM part.
PEAK_TFLOPS: dict[str, float | None] = {
    "H100": 989.0,  # SXM
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "L40": 181.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "cpu": None,
}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """Peak bf16 TFLOP/s for a device name (e.g. "NVIDIA H100 80GB HBM3"); None when unknown."""
    if override is not None:
        return override
    name = device_name.lower()
    hits = [k for k in PEAK_TFLOPS if k.lower() in name]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of peak (0..1); None when the peak is unknown."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


class StepTimer:
    """Mean wall time of the steps after `warmup` (compilation, allocator and cuDNN warm-up).

    Call `step()` after every training step and `stop()` once at the end. The device is
    synchronised only at the two window edges: a per-step sync would stall the CPU from queueing
    the next step (data prep, kernel launches) and understate steady-state throughput.
    """

    def __init__(self, warmup: int, device: torch.device | str = "cpu"):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup, self.device = warmup, torch.device(device)
        self.steps, self.timed_steps = 0, 0
        self._t0: float | None = None
        self.elapsed_s = 0.0
        if warmup == 0:
            self._open()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _open(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self._open()

    def stop(self) -> float:
        """Close the window; returns the mean step time in seconds."""
        self.timed_steps = self.steps - self.warmup
        if self._t0 is None or self.timed_steps <= 0:
            raise RuntimeError(f"no steps after warm-up (warmup={self.warmup}, steps={self.steps})")
        self._sync()
        self.elapsed_s = time.perf_counter() - self._t0
        return self.elapsed_s / self.timed_steps
