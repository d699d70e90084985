"""The stages' shared context: the job, its data (prepared once), the registry, the log, what
earlier stages found, and the record of each stage (done / skipped / failed, seconds, output)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mlops_ray.config.pipeline import PipelineJob


@dataclass
class Context:
    """What the stages share: the job, its data (prepared once), the registry, the log, and
    what earlier stages found (the run, production as it was before this pipeline)."""
    job: PipelineJob
    prepared: Any
    reg: Any
    log: Callable[[str], Any]
    names: list[str]
    done: list[dict[str, Any]] = field(default_factory=list)
    rec: dict[str, Any] = field(default_factory=dict)  # the candidate's run record
    run_store: Any = None
    prod: Any = None  # production's version before this pipeline
    already: bool = False  # production already is this run
    tag: str = ""  # a raced candidate's stages: "train[xgboost]"
    report: dict[str, Any] | None = None  # the evaluate stage's gate report
    serve_start: Any = None  # (thread, outcome) of Serve's start ahead of deploy
    folds_ahead: Any = None  # CV folds started while the run trains (train/folds.py)

    @property
    def model(self) -> str:
        return self.job.model_name

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Run a stage: print its header, time it, record done / skipped / failed."""
        name += self.tag
        n = self.names.index(name) + 1 if name in self.names else len(self.done) + 1
        self.log(f"== [{n}/{len(self.names)}] {name}")
        entry: dict[str, Any] = {"stage": name, "status": "done", "output": None, "note": ""}
        self.done.append(entry)
        t0 = time.perf_counter()
        try:
            yield entry
        except BaseException as e:
            entry["status"] = "failed"
            entry["note"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            if entry["status"] == "skipped":
                self.log(f"   skipped: {entry['note']}")


def stage_table(done: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<9} {'status':<8} {'s':>7}  output"]
    for e in done:
        lines.append(f"{e['stage']:<9} {e['status']:<8} {e.get('seconds', 0):>7.1f}  "
                     f"{e['output'] or ''}{'  (' + e['note'] + ')' if e['note'] else ''}")
    return "\n".join(lines)
