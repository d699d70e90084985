"""What makes a loop spot-safe, shared by every task's loop (`Spot`, one per rank):

* restore from the session's checkpoint first (a retry, or a rerun of the same run name), with
  the bookkeeping of restarts and of restarts from a just-in-time checkpoint;
* reseeding from (seed, epoch, step, rank) (`seed_for`), so a resumed run replays exactly the
  batches and masks an uninterrupted one would;
* reports every epoch and a checkpoint on the `checkpoint.*` schedule (every N epochs, and
  every N steps mid-epoch), and a just-in-time checkpoint as soon as Ray says a node is
  draining (`ray.train.get_preemption_info()`, a barrier every rank calls at the same points);
  then it holds still until Ray Train tears the group down at the drain deadline, so no
  completed step is redone after the restart;
* early stopping, whose state travels in the checkpoint;
* the test seams: a per-step log (MLOPS_RAY_STEP_LOG, rank 0: "<unix time> step|ckpt|start
  <epoch> <step> [seconds]", for bench/preemption.py) and the step gate (train/gate.py).
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.train.gate import StepGate

_MIX = (1_000_003, 10_007, 101)


def seed_for(seed: int, epoch: int, step: int = 0, rank: int = 0) -> int:
    return (seed * _MIX[0] + epoch * _MIX[1] + step * _MIX[2] + rank) % (2**63 - 1)


class EarlyStopping:
    def __init__(self, cfg: dict[str, Any] | None, state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.best, self.bad = (state or {}).get("best"), (state or {}).get("bad", 0)

    def update(self, metrics: dict[str, float]) -> bool:
        """Record this epoch; True when training should stop."""
        if not self.cfg:
            return False
        v, sign = metrics[self.cfg["metric"]], 1 if self.cfg["mode"] == "max" else -1
        if self.best is None or sign * (v - self.best) > self.cfg["min_delta"]:
            self.best, self.bad = v, 0
        else:
            self.bad += 1
        return self.bad >= self.cfg["patience"]

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}


class Spot:
    """Checkpoints, drains and holds for one rank of a loop. `every_steps`: mid-epoch
    checkpoints every N steps (0: none); `preempt_every`: ask about a drain every N steps
    (0: at epoch ends only)."""

    def __init__(self, session: Any, run_name: str, *, every_n_epochs: int = 1,
                 every_steps: int = 0, preempt_every: int = 0, grace_s: float = 0.0,
                 step_log: str | None = None, step_gate: str | None = None) -> None:
        self.session, self.run_name = session, run_name
        self.rank = session.rank
        self.every_n_epochs, self.every_steps = every_n_epochs, every_steps
        self.preempt_every, self.grace_s = preempt_every, grace_s
        self.gate = StepGate(step_gate, run_name, session.rank, session.world)
        self._log = open(step_log, "a", buffering=1) if self.rank == 0 and step_log else None
        self.drained = False  # a just-in-time checkpoint was taken for the current drain
        self.survived = self.restarts = 0
        self.jit_restore = False
        self.ckpt_s = 0.0

    # ---------------------------------------------------------------------- restore
    def restore(self) -> dict[str, Any] | None:
        """The state of the checkpoint to resume from (None: a fresh run)."""
        ckpt = self.session.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            st = ckpt_io.load_state(d)
        self.jit_restore = bool(st.get("jit"))
        self.survived = st.get("preemptions_survived", 0) + self.jit_restore
        self.restarts = st.get("restarts", 0) + 1
        return st

    def bookkeeping(self, jit: bool) -> dict[str, Any]:
        """What every checkpoint state carries for the next restore."""
        return {"jit": jit, "preemptions_survived": self.survived, "restarts": self.restarts}

    # ---------------------------------------------------------------------- schedule
    def between_steps(self, epoch: int, in_epoch: int, counter: int) -> str | None:
        """After a mid-epoch step (`in_epoch` steps done in `epoch`; `counter` is what the
        step schedules count): "jit" when a drain is announced (take the just-in-time
        checkpoint now), "ckpt" for a scheduled mid-epoch checkpoint, else None. Every rank
        calls this after every mid-epoch step (it may be a barrier)."""
        held_into_drain = self.gate.hold(epoch, in_epoch, self.session.preempted)
        if not self.drained and (held_into_drain or self.preempt_every
                                 and counter % self.preempt_every == 0
                                 and self.session.preempted()):
            return "jit"
        if self.every_steps and counter % self.every_steps == 0:
            return "ckpt"
        return None

    def at_epoch_end(self, epochs_done: int, done: bool) -> tuple[bool, bool]:
        """(keep a checkpoint, it is a just-in-time one) at an epoch end; every rank calls it
        (a barrier)."""
        draining = self.session.preempted() and not self.drained
        keep = done or epochs_done % self.every_n_epochs == 0 or draining
        return keep, draining

    # ---------------------------------------------------------------------- reports
    def report(self, metrics: dict[str, Any], keep: bool, name: str,
               write: Callable[[str], None] | None = None, epoch: int = 0, step: int = 0
               ) -> None:
        """All ranks call this (a barrier); rank 0 writes the checkpoint (`write(folder)`)
        when `keep`."""
        if not keep or self.rank != 0 or write is None:
            self.session.report(metrics)
            return
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write(tmp)
            self.session.report(metrics, tmp, name)
        self.ckpt_s = time.perf_counter() - t
        self.log("ckpt", epoch, step, f"{self.ckpt_s:.4f}")

    def hold(self) -> None:
        """After a just-in-time checkpoint: once per drain, wait for the restart."""
        self.drained = True
        self.session.hold(self.grace_s)

    # ---------------------------------------------------------------------- step log
    def log(self, event: str, epoch: int, step: int, extra: str = "") -> None:
        if self._log:
            self._log.write(f"{time.time():.3f} {event} {epoch} {step} {extra}\n")

    def close(self) -> None:
        if self._log:
            self._log.close()
