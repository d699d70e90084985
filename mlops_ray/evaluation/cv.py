"""Stratified k-fold cross-validation: each fold a full retrain with the run's config, its
preprocessing fitted on the fold's training part only. Folds run as Ray tasks (the only Ray in
`evaluation`), bounded by `max_parallel`; a finished fold is stored and reused on rerun."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from mlops_ray.data import Prepared, Preprocessor
from mlops_ray.evaluation.metrics import binary_metrics


def fold_indices(prepared: Prepared, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, held-out) position arrays over the non-test rows, stratified on label x
    sensitive group (coarser when a stratum is smaller than k), so small groups are in every fold."""
    rows = np.sort(np.concatenate([prepared.splits["train"], prepared.splits["val"]]))
    df = prepared.frame.iloc[rows]
    cols = [prepared.label, *[c for c in prepared.sensitive if c in df.columns]]
    key = None
    for n in range(len(cols), 0, -1):
        cand = df[cols[:n]].astype(str).agg("|".join, axis=1)
        if cand.value_counts().min() >= k:
            key = cand.to_numpy()
            break
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    strat = key if key is not None else df[prepared.label].astype(str).to_numpy()
    return [(rows[a], rows[b]) for a, b in skf.split(rows, strat)]


def run_fold(cfg: dict[str, Any], prepared: Prepared, train_rows: np.ndarray,
             held_rows: np.ndarray, fold: int, epochs: int | None = None,
             step_gate: str | None = None) -> dict[str, Any]:
    """Train one fold in this process (no Ray session) and score its held-out rows."""
    from mlops_ray.train import checkpoint as ckpt_io
    from mlops_ray.train.loop import train_loop_per_worker
    from mlops_ray.train.trainer import loop_config, penalty_attribute
    seed = cfg["seed"] + fold
    fit_rows, es_rows = train_test_split(train_rows, test_size=0.1, random_state=seed,
                                         stratify=prepared.frame.iloc[train_rows][prepared.label])
    numeric, categorical = prepared.preprocessor.numeric, prepared.preprocessor.categorical
    pre = Preprocessor.fit(prepared.frame.iloc[fit_rows], numeric, categorical)

    def xy(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = prepared.frame.iloc[rows]
        return pre.transform(part), prepared.labels(part)
    (xt, yt), (xv, yv), (xh, yh) = xy(fit_rows), xy(es_rows), xy(held_rows)
    data = {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv}
    attr = penalty_attribute(cfg)
    if attr:
        col = prepared.frame.iloc[fit_rows][attr].astype(str).to_numpy()
        data["g_train"] = np.unique(col, return_inverse=True)[1].astype(np.int64)
    fold_cfg = {**cfg, "train": {**cfg["train"], "epochs": epochs or cfg["train"]["epochs"]}}
    with tempfile.TemporaryDirectory() as d:
        lc = loop_config(fold_cfg, {"feature_names": pre.feature_names,
                                    "preprocessor": pre.to_dict()}, None, f"fold-{fold}")
        lc.update(session="local", data=data, local_dir=d, seed=seed, step_gate=step_gate)
        out = train_loop_per_worker(lc)
        model, _, _ = ckpt_io.load_model(d)
    p = ckpt_io.predict_proba(model, xh)
    return {"fold": fold, "rows": int(len(held_rows)), "epochs": len(out["history"]),
            **binary_metrics(yh, p)}


def cross_validate(cfg: dict[str, Any], prepared: Prepared, k: int, *, parallel: bool = True,
                   max_parallel: int = 2, cpus_per_fold: float = 1.0, epochs: int | None = None,
                   load: Callable[[int], dict | None] = lambda i: None,
                   save: Callable[[int, dict], None] = lambda i, r: None,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per-fold metrics, reusing folds that `load` returns; `save` stores each new one."""
    from mlops_ray.train.gate import from_env
    gate = from_env()  # read here: folds run in Ray workers (a test seam, train/gate.py)
    folds = fold_indices(prepared, k, cfg["seed"])
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i in range(k):
        done = load(i)
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    if todo:
        log(f"cross-validation: {len(todo)} of {k} fold(s) to train"
            + (f" ({k - len(todo)} reused)" if len(todo) < k else ""))
    if parallel and todo:
        import ray
        remote = ray.remote(num_cpus=cpus_per_fold, max_retries=2)(run_fold)
        cfg_ref, prep_ref = ray.put(cfg), ray.put(prepared)
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
            results[i] = run_fold(cfg, prepared, *folds[i], i, epochs, gate)
            save(i, results[i])
    return [results[i] for i in range(k)]


def summarise(folds: list[dict[str, Any]], keys: tuple[str, ...] = ("auc", "pr_auc", "accuracy",
                                                                    "log_loss", "brier")
              ) -> dict[str, float]:
    """cv/<metric>_mean, _std and the t-interval of the mean over the folds."""
    from mlops_ray.evaluation.stats import mean_std_ci
    out: dict[str, float] = {}
    for key in keys:
        r = mean_std_ci([f[key] for f in folds])
        out.update({f"cv/{key}_mean": r["mean"], f"cv/{key}_std": r["std"],
                    f"cv/{key}_ci_low": r["ci_low"], f"cv/{key}_ci_high": r["ci_high"]})
    return out
