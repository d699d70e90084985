"""The tuning driver's Tune callbacks: live W&B runs per trial, and the study's gauges on the
Ray dashboard / Prometheus."""
from __future__ import annotations

import math
from typing import Any

from mlops_ray.config.tune import TuneJob
from mlops_ray.storage import Storage


def wandb_callback(job: TuneJob, storage: Storage, study: str) -> list[Any]:
    """One W&B run per trial (`trial-<id>`, grouped by the study), logged live by the tuning
    driver from each trial's reports, finished when the trial ends."""
    if job.tracking.backend == "none":
        return []
    from ray.tune import Callback

    from mlops_ray.tracking import Live, local_dir
    tracking = {**job.tracking.plain(), "dir": local_dir(job.storage.plain()), "group": study}

    class TrialRuns(Callback):
        def __init__(self) -> None:
            self.runs: dict[str, Live] = {}

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            if trial.trial_id not in self.runs:
                self.runs[trial.trial_id] = Live(tracking, f"trial-{trial.trial_id}", 0,
                                                 dict(trial.config), several=True)
            self.runs[trial.trial_id].log(result, step=int(result.get("epoch", iteration)))

        def _end(self, trial: Any) -> None:
            if (run := self.runs.pop(trial.trial_id, None)) is not None:
                run.finish()

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                              **info: Any) -> None:
            self._end(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            self._end(trial)

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            for trial in trials:
                self._end(trial)

    return [TrialRuns()]


def metrics_callback(study: str, metric: str, mode: str) -> Any:
    """A Tune callback publishing trial counts by state and the best value so far as
    `ray_mlops_tune_trials{study,state}` / `ray_mlops_tune_best{study}` (Ray dashboard,
    Prometheus)."""
    from ray import tune

    from mlops_ray.metrics import metric as ray_metric

    class TuneMetrics(tune.Callback):
        def __init__(self) -> None:
            self.trials = ray_metric("mlops_tune_trials")
            self.best = ray_metric("mlops_tune_best")
            self.value: float | None = None

        def _publish(self, trials: list[Any]) -> None:
            counts: dict[str, int] = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            for state in ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR"):
                self.trials.set(counts.get(state, 0), tags={"study": study, "state": state})

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            v = result.get(metric, math.nan)  # absent: NaN, never better
            better = self.value is None or (v > self.value if mode == "max" else v < self.value) \
                if isinstance(v, (int, float)) and v == v else False
            if better:
                self.value = float(v)
                self.best.set(self.value, tags={"study": study})
            self._publish(trials)

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            self._publish(trials)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                              **info: Any) -> None:
            self._publish(trials)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            self._publish(trials)

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            self._publish(trials)  # a completing trial's status changes after its callback

    return TuneMetrics()
