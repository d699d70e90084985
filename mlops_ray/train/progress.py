"""The console line of each report, printed by the Train controller (driver.py's Progress
callback). Its own light module: what the callback references is imported by the controller's
process, and the task modules import torch and scikit-learn (seconds on the fit() start's
critical path)."""
from __future__ import annotations

from typing import Any


def tabular_line(m: dict[str, Any], checkpoint: bool) -> str | None:
    if "best_round" in m:  # trees: the last report, the model the run keeps
        return (f"[mlops_ray] kept: the model's first {m['best_round']} rounds (best on "
                f"validation), val/auc={m['val/auc']:.4f} val/loss={m['val/loss']:.4f}")
    if "round" in m and "time/rounds_per_s" in m:  # trees
        return (f"[mlops_ray] round {m['round']}: val/auc={m['val/auc']:.4f} "
                f"val/loss={m['val/loss']:.4f} {m['time/rounds_per_s']:.1f} rounds/s"
                + (" [checkpoint]" if checkpoint else ""))
    if "train/loss" not in m:
        return None
    return (f"[mlops_ray] epoch {m['epoch']}: train/loss={m['train/loss']:.4f} "
            f"val/auc={m['val/auc']:.4f} {m['time/samples_per_s']:.0f} samples/s"
            + (" [checkpoint]" if checkpoint else ""))


def lm_line(m: dict[str, Any], checkpoint: bool = False) -> str | None:
    if "perf/tokens_per_s" not in m:
        return None
    line = (f"[mlops_ray] step {m['step']}: train/loss={m['train/loss']:.4f}"
            + (f" val/loss={m['val/loss']:.4f}" if "val/loss" in m else "")
            + f" {m['perf/tokens_per_s']:,.0f} tokens/s {m['perf/step_ms']:.1f} ms/step"
            + (f" MFU {100 * m['perf/mfu']:.1f}%" if m.get("perf/mfu") is not None else "")
            + (f" {m['perf/gpu_mem_gib']:.2f} GiB" if m.get("perf/gpu_mem_gib") is not None
               else ""))
    return line + (" [checkpoint]" if checkpoint else "")
