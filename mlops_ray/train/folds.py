"""Cross-validation folds as training: each fold a full retrain with the run's own config, its
preprocessing fitted on the fold's training part only, in this process (`run_fold`) or fanned
out as Ray tasks bounded by `max_parallel` (`train_folds`). Which rows make a fold, and what the
folds add up to, is evaluation's (evaluation/cv.py); a finished fold is stored by the caller
and reused on rerun."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from mlops_ray.config.train import TrainJob


def run_fold(job: TrainJob, prepared: Any, train_rows: np.ndarray, held_rows: np.ndarray,
             fold: int, epochs: int | None = None, step_gate: str | None = None
             ) -> dict[str, Any]:
    """Train one fold in this process (no Ray session) and score its held-out rows."""
    from mlops_ray.artifacts import checkpoint as ckpt_io
    from mlops_ray.data import Preprocessor
    from mlops_ray.evaluation.metrics import binary_metrics
    from mlops_ray.train.session import LocalSession
    from mlops_ray.train.tasks import tabular_loop
    from mlops_ray.train.tasks.tabular import loop_config
    seed = job.seed + fold
    fit_rows, es_rows = train_test_split(train_rows, test_size=0.1, random_state=seed,
                                         stratify=prepared.frame.iloc[train_rows][prepared.label])
    numeric, categorical = prepared.preprocessor.numeric, prepared.preprocessor.categorical
    pre = Preprocessor.fit(prepared.frame.iloc[fit_rows], numeric, categorical)

    def xy(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = prepared.frame.iloc[rows]
        return pre.transform(part), prepared.labels(part)
    (xt, yt), (xv, yv), (xh, yh) = xy(fit_rows), xy(es_rows), xy(held_rows)
    data = {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv}
    attr = job.penalty_attribute()
    if attr:
        col = prepared.frame.iloc[fit_rows][attr].astype(str).to_numpy()
        data["g_train"] = np.unique(col, return_inverse=True)[1].astype(np.int64)
    fold_job = job.model_copy(update={"train": job.train.model_copy(
        update={"epochs": epochs or job.train.epochs})})
    lc = loop_config(fold_job, pre.feature_names, pre.to_dict(), f"fold-{fold}")
    # no W&B run per fold: the evaluation's report and card are the record of the folds
    lc = lc.model_copy(update={"seed": seed, "step_gate": step_gate, "tracking": None})
    with tempfile.TemporaryDirectory() as d:
        out = tabular_loop(lc.plain(), LocalSession(d, data))
        model, _, _ = ckpt_io.load_model(d)
    p = ckpt_io.predict_proba(model, xh)
    return {"fold": fold, "rows": int(len(held_rows)), "epochs": len(out["history"]),
            **binary_metrics(yh, p)}


def _remote_fold(cfg: dict[str, Any], prepared: Any, train_rows: np.ndarray,
                 held_rows: np.ndarray, fold: int, epochs: int | None,
                 step_gate: str | None) -> dict[str, Any]:
    return run_fold(TrainJob.stored(cfg), prepared, train_rows, held_rows, fold, epochs,
                    step_gate)


def train_folds(job: TrainJob, prepared: Any, folds: list[tuple[np.ndarray, np.ndarray]],
                todo: list[int], *, parallel: bool = True, max_parallel: int = 2,
                cpus_per_fold: float = 0.5, epochs: int | None = None,
                save: Callable[[int, dict], None] = lambda i, r: None,
                log: Callable[[str], None] = print) -> dict[int, dict[str, Any]]:
    """Train the folds numbered in `todo`; `save` stores each as it finishes."""
    from mlops_ray.train.gate import from_env
    gate = from_env()  # read here: folds run in Ray workers (a test seam, train/gate.py)
    results: dict[int, dict[str, Any]] = {}
    if parallel and todo:
        import ray
        remote = ray.remote(num_cpus=cpus_per_fold, max_retries=2)(_remote_fold)
        cfg_ref, prep_ref = ray.put(job.plain()), ray.put(prepared)
        pending: dict[Any, int] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < max_parallel:
                i = queue.pop(0)
                pending[remote.remote(cfg_ref, prep_ref, *folds[i], i, epochs, gate)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            results[i] = ray.get(ready[0])
            save(i, results[i])
            log(f"  fold {i}: auc {results[i]['auc']:.4f}")
    else:
        for i in todo:
            results[i] = run_fold(job, prepared, *folds[i], i, epochs, gate)
            save(i, results[i])
    return results
