"""jobs.pipeline and jobs.monitor (conf/pipeline.yaml, conf/monitor.yaml): the train, evaluate
and promote sections, the tuning sections (`tune.enabled=true`), the Serve sections of the deploy
and smoke stages, and when the monitor retrains. Each stage runs the job it stands for, seen
through that job's own schema (`train_job()`, `tune_job()`, ...)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mlops_ray.config.base import Strict, problems, view
from mlops_ray.config.evaluate import EvaluateJob, EvaluateSections, PromoteJob, PromoteSections
from mlops_ray.config.serve import ServeCfg, ServeJob
from mlops_ray.config.train import TrainJob
from mlops_ray.config.tune import ParamSpec, SchedulerCfg, SearchCfg, TuneCfg, TuneJob

Stage = Literal["train", "evaluate", "promote", "deploy", "smoke"]
PIPELINE_STAGES: tuple[Stage, ...] = ("train", "evaluate", "promote", "deploy", "smoke")


class PipelineTuneCfg(TuneCfg):
    enabled: bool = False  # tune.enabled=true: a study instead of one training run


class SmokeCfg(Strict):
    rows: int = Field(200, ge=1)


class PipelineJob(TrainJob, EvaluateSections, PromoteSections):
    run: str | None = None  # type: ignore[assignment]  # optional here: train makes it
    stages: list[Stage] = list(PIPELINE_STAGES)
    # model groups (conf/model/<name>.yaml) to race through the same gates; the best passing
    # one (by cv/auc_mean) is promoted. Empty: this job's own model only
    candidates: list[str] = []
    trigger: str | None = None
    tune: PipelineTuneCfg = PipelineTuneCfg()
    space: dict[str, ParamSpec] = {}
    search: SearchCfg = SearchCfg()
    scheduler: SchedulerCfg = SchedulerCfg()
    smoke: SmokeCfg = SmokeCfg()
    serve: ServeCfg = ServeCfg()

    @model_validator(mode="after")
    def _pipeline_cross(self) -> PipelineJob:
        p: list[str] = []
        order = [s for s in PIPELINE_STAGES if s in self.stages]
        if self.stages != order or len(set(self.stages)) != len(self.stages):
            p.append(f"stages={self.stages}: list each stage once, in the order "
                     f"{list(PIPELINE_STAGES)}")
        if not self.stages:
            p.append("stages: empty; allowed: any ordered subset of "
                     f"{list(PIPELINE_STAGES)}")
        if "train" not in self.stages and not self.run:
            p.append(f"stages={self.stages} has no train stage: give run=<run folder or tuning "
                     "folder> to start from")
        if "train" in self.stages and self.run:
            p.append(f"run={self.run!r} with a train stage: drop one (run= starts after train)")
        if len(set(self.candidates)) != len(self.candidates):
            p.append(f"candidates={self.candidates}: list each model once")
        if self.candidates and "train" not in self.stages:
            p.append(f"candidates={self.candidates} race trained models: keep the train stage")
        if self.candidates and self.tune.enabled:
            p.append(f"candidates={self.candidates} with tune.enabled=true: the search space "
                     "is one model's; tune each experiment, or race them untuned")
        if self.tune.enabled:
            if not self.space:
                p.append("tune.enabled=true needs a search space (conf/space/<experiment>.yaml)")
            else:  # the study's own cross-checks (CPU fit, ASHA + Train trials, metric)
                try:
                    self.tune_job()
                except ValueError as e:
                    p.append(f"tune.enabled=true: {e}")
        problems(p)
        return self

    @property
    def model_name(self) -> str:
        """The registry model this pipeline promotes into."""
        return self.promote.model or self.name

    def train_job(self) -> TrainJob:
        return view(self, TrainJob)

    def tune_job(self) -> TuneJob:
        # ASHA stops trials early; the run's own early stopping would fight it
        t = self.tune.model_dump(exclude={"enabled"})
        return view(self, TuneJob, tune=t,
                    train={**self.train.plain(), "early_stopping": None})

    def evaluate_job(self, run: str, champion: str | None) -> EvaluateJob:
        return view(self, EvaluateJob, run=run, champion=champion)

    def promote_job(self, run: str, **promote: Any) -> PromoteJob:
        return view(self, PromoteJob, run=run, promote={**self.promote.plain(), **promote})

    def serve_job(self) -> ServeJob:
        return view(self, ServeJob, ref=f"{self.model_name}@production")


class MonitorCfg(Strict):
    # the retraining data: null assembles it from the prediction log's labelled traffic plus
    # the original training data (mlops_ray/pipeline/traffic.py); a path/URI names a table
    new_data: str | None = Field(None, min_length=1)
    interval_s: float = Field(30, gt=0)
    once: bool = False
    max_drifted_features: int = Field(1, ge=0)
    min_live_auc: float | None = Field(None, gt=0, le=1)
    min_labelled_rows: int = Field(200, ge=1)
    # the gates (test/* and fair/* rules) judged on labelled traffic of the production version:
    # one that would fail triggers a retraining
    live_gates: bool = True
    # retraining from the log: original rows sampled per labelled traffic row (all at most)
    original_ratio: float = Field(1.0, ge=0)
    # point in time of the log (ISO 8601, UTC if no zone): predictions and labels known by
    # then; null: the time of each check
    cutoff: str | None = None
    canary_max_prediction_shift: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _some_trigger(self) -> MonitorCfg:
        if not self.max_drifted_features and self.min_live_auc is None and not self.live_gates:
            raise ValueError("monitor: nothing to watch (set max_drifted_features >= 1, "
                             "min_live_auc or live_gates=true)")
        if self.cutoff is not None:
            from datetime import datetime
            try:
                datetime.fromisoformat(self.cutoff)
            except ValueError:
                raise ValueError(f"monitor.cutoff={self.cutoff!r}: not an ISO 8601 time "
                                 "(e.g. 2026-11-30T12:00:00+00:00)") from None
        return self


class MonitorJob(PipelineJob):
    """jobs.monitor: the pipeline it runs when the production deployment drifts."""
    monitor: MonitorCfg

    @model_validator(mode="after")
    def _feature_store(self) -> MonitorJob:
        if self.dataset.feast is not None:
            raise ValueError(
                f"dataset '{self.dataset.name}' comes from a feature store (dataset.feast): "
                "jobs.monitor cannot retrain it yet (the prediction log and monitor.new_data "
                "hold features, not an entity frame to join); retrain with jobs.pipeline on a "
                "new entity frame (dataset.uri)")
        return self


class LabelsJob(PipelineJob):
    """jobs.labels: import a file of late labels into the label log."""
    file: str = Field(min_length=1)  # csv or parquet: request_id, label, time[, row]
    source: str | None = None  # recorded with each label (default: the file name)
