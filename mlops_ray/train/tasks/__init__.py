"""Training tasks: what the driver (train/driver.py) runs. A task is its per-worker loop, the
loop's config, the data version, what it adds to the run record, and its summary. Adding a
model family is one module here (with `make(job, prepared) -> Task`) and a config group."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    name: str
    loop: Callable[[dict[str, Any]], dict[str, Any]]  # Ray Train's train_loop_per_worker
    loop_config: Callable[[str], dict[str, Any]]  # run name -> the plain dict the workers get
    data_version: str
    dataset: dict[str, Any]  # run.json "dataset"
    progress: Callable[[dict[str, Any], bool], str | None]  # one console line per report
    summary: Callable[[dict[str, Any]], list[str]]  # the lines after the run
    finish: Callable[[dict[str, Any], Any], None] = lambda record, best: None  # e.g. test metrics
    finish_imports: tuple[str, ...] = ()  # what `finish` imports: done while fit() waits
    record: dict[str, Any] = field(default_factory=dict)  # extra run.json fields
    step_key: str = "epoch"  # what numbers the W&B steps
    live_tracking: bool = False  # the loop logs to W&B itself as it goes (rank 0)
    trainer: str = "torch"  # Ray Train's trainer: torch | xgboost | lightgbm
    best_is_latest: bool = False  # the loop's last report is its model (trees: the ES cut)


def tabular_loop(config: dict[str, Any], session: Any = None) -> dict[str, Any]:
    """The per-worker loop of a tabular model: the boosting loop for trees, else the MLP's
    (Ray Train, Tune trials and CV folds all call this one)."""
    from mlops_ray.models.trees import is_tree
    if is_tree(config.get("model")):
        from mlops_ray.train.tasks import trees
        return trees.train_loop_per_worker(config, session)
    from mlops_ray.train.tasks import tabular
    return tabular.train_loop_per_worker(config, session)


def task_for(job: Any, prepared: Any = None) -> Task:
    """The task a validated train job names (`task: lm`, else the tabular MLP)."""
    if getattr(job, "task", None) == "lm":
        from mlops_ray.train.tasks import lm
        return lm.make(job)
    from mlops_ray.train.tasks import tabular
    return tabular.make(job, prepared)


def gate_metrics(gate: dict[str, Any], data: dict[str, Any], p_val: Any) -> dict[str, float]:
    """The promotion gates estimated on the validation rows, as a tuning trial reports them
    (`constraint/<rule>`, `feasible`; tune.gate_aware, evaluation/feasibility.py)."""
    from mlops_ray.evaluation.feasibility import as_metrics, estimate
    return as_metrics(estimate(data["y_val"], p_val, data["s_val"], **gate))
