"""OptunaSearch that survives a killed tuning driver.

A trial can finish in the Optuna study (told COMPLETE) after Tune's last experiment snapshot;
the restored Tune run then resumes that trial from its checkpoint and reports to an Optuna
trial that is already finished, and Ray 2.60's OptunaSearch lets optuna's
UpdateFinishedTrialError crash the whole study. Here the late report is dropped: the study
keeps the value it already has, and Tune finishes the trial.
"""
from __future__ import annotations

import logging
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            log.warning("trial %s already finished in the Optuna study before the restart; "
                        "its resumed results are not reported again", trial_id)
