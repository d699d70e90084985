"""A step gate: holds a training run at a chosen step until whoever set it lets it go.

A test seam, like MLOPS_RAY_STEP_LOG: with MLOPS_RAY_STEP_GATE=<folder> in the driver's
environment, every training loop of that driver looks at `<folder>/gate.json` after each
mid-epoch step:

    {"epoch": E, "step": S, "pass": N}

A run that has done S steps of epoch E (or is further on) waits there until the file is removed
or names a later position; the first N runs to arrive go on (tickets: "let the first two CV
folds finish, hold the third"). While it waits, a Ray Train run keeps asking Ray for a preemption
notice (a barrier every rank calls), so a drain announced meanwhile ends the wait and the loop
takes its just-in-time checkpoint at the held step. Every worker that waits appends a line to
`<folder>/events.jsonl` (run, rank, world size, pid, node id, epoch, step, event).

Tests use it to make "kill the node while a run is at X" a matter of order, not of speed: the
run cannot finish, or move past X, before the test has acted. Without the variable nothing is
read and nothing waits.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "MLOPS_RAY_STEP_GATE"


def from_env() -> str | None:
    """The gate folder the driver was started with (None: no gate)."""
    return os.environ.get(ENV) or None


class StepGate:
    def __init__(self, folder: str | None, run: str, rank: int = 0, world: int = 1,
                 poll_s: float = 0.1) -> None:
        self.folder = Path(folder) if folder else None
        self.run, self.rank, self.world, self.poll_s = run, rank, world, poll_s
        self._past: tuple[int, int] | None = None  # a gate this run already went through

    def _read(self) -> tuple[int, int, int] | None:
        assert self.folder is not None
        try:
            spec = json.loads((self.folder / "gate.json").read_text())
            return int(spec["epoch"]), int(spec["step"]), int(spec.get("pass", 0))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _shared(self, values: list[int]) -> list[int]:
        """Rank 0's view for every rank: the ranks must agree on every wait (barriers)."""
        if self.world == 1:
            return values
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            import torch
            t = torch.tensor(values, dtype=torch.long)
            dist.broadcast(t, src=0)
            return [int(x) for x in t.tolist()]
        # no torch process group (XGBoost, LightGBM workers): Ray Train's own broadcast
        from ray.train.collective import broadcast_from_rank_zero
        return [int(x) for x in broadcast_from_rank_zero(values)]

    def _spec(self) -> tuple[int, int, int] | None:
        got = self._read() if self.rank == 0 else None
        on, e, s, n = self._shared([1, *got] if got else [0, 0, 0, 0])
        return (e, s, n) if on else None

    def _ticket(self) -> int:
        """0, 1, 2, ... in order of arrival, across processes (O_EXCL creates are atomic)."""
        assert self.folder is not None
        tickets = self.folder / "tickets"
        tickets.mkdir(exist_ok=True)
        i = 0
        while True:
            try:
                os.close(os.open(tickets / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return i
            except FileExistsError:
                i += 1

    def _event(self, event: str, epoch: int, step: int) -> None:
        assert self.folder is not None
        node = None
        try:
            import ray
            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - the node id is a convenience for the reader
            pass
        line = json.dumps({"event": event, "run": self.run, "rank": self.rank,
                           "world": self.world, "pid": os.getpid(), "node_id": node,
                           "epoch": epoch, "step": step, "time": time.time()})
        with open(self.folder / "events.jsonl", "a") as f:  # one short append: atomic
            f.write(line + "\n")

    def hold(self, epoch: int, step: int, preempted: Callable[[], bool]) -> bool:
        """Called by every rank after `step` steps of `epoch`. Waits while the gate holds this
        position; True when a drain was announced meanwhile (take the JIT checkpoint now)."""
        if self.folder is None:
            return False
        spec = self._spec()
        if spec is None or (epoch, step) < spec[:2] or self._past == spec[:2]:
            return False
        e, s, n = spec
        if n > 0:  # the first n arrivals go on
            go = self._shared([int(self._ticket() < n) if self.rank == 0 else 0])[0]
            if go:
                self._past = (e, s)
                self._event("passed", epoch, step)
                return False
        self._event("waiting", epoch, step)
        while True:
            if preempted():
                self._past = (e, s)
                self._event("drained", epoch, step)
                return True
            now = self._spec()
            if now is None or (epoch, step) < now[:2]:
                self._event("released", epoch, step)
                return False
            time.sleep(self.poll_s)


class Gate:
    """The other side (tests, benchmarks): set, move and lift the gate, read its events."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {ENV: str(self.folder)}

    def hold(self, epoch: int, step: int, let_pass: int = 0) -> None:
        """Hold runs after `step` (>= 1) steps of `epoch`; the first `let_pass` go on."""
        if step < 1:
            raise ValueError("the gate sits after a mid-epoch step: step >= 1")
        tmp = self.folder / "gate.json.tmp"
        tmp.write_text(json.dumps({"epoch": epoch, "step": step, "pass": let_pass}))
        tmp.replace(self.folder / "gate.json")

    def release(self) -> None:
        (self.folder / "gate.json").unlink(missing_ok=True)

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        path = self.folder / "events.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        return [r for r in rows if (event is None or r["event"] == event)
                and all(r.get(k) == v for k, v in match.items())]
