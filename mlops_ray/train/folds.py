"""Cross-validation folds as training: each fold a full retrain with the run's own config, its
preprocessing fitted on the fold's training part only, in this process (`run_fold`) or fanned
out as Ray tasks bounded by `max_parallel` (`train_folds`), or one at a time while the run itself
trains (`FoldsAhead`, handed over to `train_folds`). Which rows make a fold, and what the folds
add up to, is evaluation's (evaluation/cv.py); a finished fold is stored by the caller and
reused on rerun."""
from __future__ import annotations

import tempfile
import threading
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


def _remote(cpus_per_fold: float) -> Any:
    import ray
    return ray.remote(num_cpus=cpus_per_fold, max_retries=2)(_remote_fold)


class FoldsAhead:
    """CV folds trained on Ray one at a time, on a thread, while the run they judge trains.

    On 2 cores a one-worker training run leaves the second core partly idle (process starts,
    imports, a one-thread loop); a fold uses it. One at a time, so the run's own workers still
    find their CPUs. `hand_over()` stops it (a fold under way goes on) and gives `train_folds`
    what it has; `cancel()` drops it. Its folds are the ones evaluation would train: the same
    config, data, rows, epochs and CPUs, or `train_folds` ignores them. It starts none unless
    the cluster has room for a fold beside the `run_cpus` the run asks for: a run waiting for
    its CPUs behind a fold would only lose time."""

    def __init__(self, job: TrainJob, prepared: Any,
                 make_folds: Callable[[], list[tuple[np.ndarray, np.ndarray]]], *,
                 cpus_per_fold: float = 0.5, epochs: int | None = None,
                 run_cpus: float = 1.0) -> None:
        from mlops_ray.train.gate import from_env
        self.run_cpus = run_cpus
        self.job, self.prepared, self.make_folds = job, prepared, make_folds
        self.folds: list[tuple[np.ndarray, np.ndarray]] = []
        self.cpus_per_fold, self.epochs, self.gate = cpus_per_fold, epochs, from_env()
        self.results: dict[int, dict[str, Any]] = {}
        self.running: dict[Any, int] = {}  # ObjectRef -> fold
        self.error: BaseException | None = None
        self.skipped = ""  # why no fold started
        self.refs: tuple[Any, Any] | None = None  # (config, data) in the object store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="folds-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray
        try:
            self.folds = self.make_folds()  # off the driver's thread: the run starts meanwhile
            while not ray.is_initialized():  # the run's own start attaches this process
                if self._stop.wait(0.1):
                    return
            if self._stop.is_set():
                return
            # before the run's workers hold theirs (its controller takes seconds to start)
            free = ray.available_resources().get("CPU", 0.0)
            if free < self.run_cpus + self.cpus_per_fold:
                self.skipped = (f"{free:g} CPU free, the run asks for {self.run_cpus:g} and a "
                                f"fold for {self.cpus_per_fold:g}")
                return
            remote = _remote(self.cpus_per_fold)
            self.refs = cfg_ref, prep_ref = ray.put(self.job.plain()), ray.put(self.prepared)
            for i, (train_rows, held_rows) in enumerate(self.folds):
                if self._stop.is_set():
                    return
                ref = remote.remote(cfg_ref, prep_ref, train_rows, held_rows, i, self.epochs,
                                    self.gate)
                self.running[ref] = i
                # short: hand_over, on evaluation's critical path, waits for this to notice
                while not ray.wait([ref], timeout=0.1)[0]:
                    if self._stop.is_set():
                        return  # under way: train_folds takes it over
                try:
                    self.results[i] = ray.get(ref)
                finally:
                    del self.running[ref]  # a failed fold is trained again by train_folds
        except Exception as e:  # noqa: BLE001 - reported by train_folds
            self.error = e

    def matches(self, job: TrainJob, prepared: Any, folds: list[tuple[np.ndarray, np.ndarray]],
                cpus_per_fold: float, epochs: int | None) -> bool:
        return (job.config_hash() == self.job.config_hash() and prepared is self.prepared
                and epochs == self.epochs and cpus_per_fold == self.cpus_per_fold
                and len(folds) == len(self.folds)
                and all(np.array_equal(a, b)
                        for f, g in zip(folds, self.folds) for a, b in zip(f, g)))

    def started(self) -> set[int]:
        """The folds finished or under way (a copy: the thread goes on)."""
        return set(dict(self.results)) | set(dict(self.running).values())

    def alive(self) -> bool:
        return self._thread.is_alive()

    def hand_over(self, timeout_s: float = 60) -> tuple[dict[int, dict[str, Any]],
                                                         dict[Any, int]]:
        """Stop starting folds; the finished ones and those under way (ObjectRef -> fold)."""
        self._stop.set()
        self._thread.join(timeout_s)  # at most one ray.wait of 0.1 s, unless Ray hangs
        if self._thread.is_alive():
            return {}, {}
        return dict(self.results), dict(self.running)

    def cancel(self) -> None:
        for ref in self.hand_over()[1]:
            _cancel(ref)


def _cancel(ref: Any) -> None:
    import ray
    ray.cancel(ref, force=True)  # an early fold has no side effect: its core is freed at once


def train_folds(job: TrainJob, prepared: Any, folds: list[tuple[np.ndarray, np.ndarray]],
                todo: list[int], *, parallel: bool = True, max_parallel: int = 2,
                cpus_per_fold: float = 0.5, epochs: int | None = None,
                save: Callable[[int, dict], None] = lambda i, r: None,
                log: Callable[[str], None] = print,
                ahead: FoldsAhead | None = None) -> dict[int, dict[str, Any]]:
    """Train the folds numbered in `todo`; `save` stores each as it finishes. `ahead`: folds
    started while the run trained, taken over when they are these very folds."""
    from mlops_ray.train.gate import from_env
    gate = from_env()  # read here: folds run in Ray workers (a test seam, train/gate.py)
    results: dict[int, dict[str, Any]] = {}
    pending: dict[Any, int] = {}
    beside: set[int] = set()  # under way when taken over from `ahead`
    refs = None  # `ahead`'s config and data in the object store, when these are its folds
    if ahead is not None:
        done, started = ahead.hand_over()
        usable = parallel and ahead.matches(job, prepared, folds, cpus_per_fold, epochs)
        for ref, i in started.items():
            if usable and i in todo:  # under way: taken over
                pending[ref] = i
            else:
                _cancel(ref)  # other folds, or one stored meanwhile
        for i in [i for i in todo if usable and i in done]:
            results[i] = done[i]
            save(i, results[i])
            log(f"  fold {i}: auc {results[i]['auc']:.4f} (trained beside the run)")
        if not usable:
            log("  folds started beside the run are not these folds (config, data, rows, "
                "epochs or CPUs differ): cancelled")
        elif ahead.error is not None:
            log(f"  training folds beside the run stopped ({type(ahead.error).__name__}: "
                f"{ahead.error}): the rest are trained here")
        elif ahead.skipped:
            log(f"  no fold started beside the run: {ahead.skipped}")
        beside = set(pending.values())
        refs = ahead.refs if usable else None
        todo = [i for i in todo if i not in results and i not in pending.values()]
    if parallel and (todo or pending):
        import ray
        remote = _remote(cpus_per_fold)
        cfg_ref, prep_ref = refs or (ray.put(job.plain()), ray.put(prepared))
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < max_parallel:
                i = queue.pop(0)
                pending[remote.remote(cfg_ref, prep_ref, *folds[i], i, epochs, gate)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            results[i] = ray.get(ready[0])
            save(i, results[i])
            log(f"  fold {i}: auc {results[i]['auc']:.4f}"
                + (" (started beside the run)" if i in beside else ""))
    else:
        for i in todo:
            results[i] = run_fold(job, prepared, *folds[i], i, epochs, gate)
            save(i, results[i])
    return results
