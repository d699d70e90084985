"""jobs.evaluate and jobs.promote: the gates (data), cross-validation, threshold, fairness and
mitigation, and the promotion's registry settings. Jobs are the train job's sections composed
with these bundles (conf/evaluate.yaml, conf/promote.yaml)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlops_ray.config.base import NAME_RE, DbCfg, RegistrySections, Strict, view
from mlops_ray.config.train import TrainJob


class GateRule(Strict):
    name: str  # "{attr}" in name and metric expands over the dataset's sensitive attributes
    metric: str
    op: Literal[">=", "<=", ">", "<"]
    threshold: float
    compare: Literal["value", "ci_low", "ci_high"] = "value"  # the value or an end of its CI


class ChampionGate(Strict):
    metric: str = "test/auc"
    max_drop: float = Field(0.005, ge=0)
    test: Literal["bootstrap", "delong"] = "bootstrap"
    alpha: float = Field(0.05, gt=0, lt=1)


class GatesCfg(Strict):
    rules: list[GateRule]
    champion: ChampionGate = ChampionGate()


class CvCfg(Strict):
    folds: int = Field(5, ge=2, le=20)
    epochs: int | None = Field(None, ge=1)
    parallel: bool = True
    max_parallel: int = Field(2, ge=1)
    cpus_per_fold: float = Field(0.5, gt=0)
    during_training: bool = True  # jobs.pipeline: folds start, one at a time, as the run trains


class ThresholdCfg(Strict):
    objective: Literal["f1", "youden", "accuracy"] = "f1"
    # the predicted-positive rate stays within [base rate / r, base rate * r] (null: no guard)
    max_rate_ratio: float | None = Field(1.5, gt=1)


class FairnessCfg(Strict):
    attributes: list[str] | None = None
    min_group_size: int = Field(30, ge=1)
    n_boot: int = Field(200, ge=10)
    mitigation: Literal["none", "threshold"] = "threshold"
    constraint: Literal["demographic_parity", "equalized_odds"] = "equalized_odds"
    mitigation_attribute: str | None = None


class EvaluateSections(Strict):
    run: str
    db: DbCfg = DbCfg()  # locates the registry's signing key (registry/signing.py)
    champion: str | None = None
    cv: CvCfg = CvCfg()
    threshold: ThresholdCfg = ThresholdCfg()
    fairness: FairnessCfg = FairnessCfg()
    gates: GatesCfg
    n_boot: int = Field(500, ge=10)


class EvaluateJob(TrainJob, EvaluateSections):
    """jobs.evaluate: the run is retrained per fold with ITS config (run.json); of the train
    sections this job uses where it runs (storage, ray, cluster)."""


class PromoteCfg(Strict):
    model: str | None = None  # registry model name; None: the run's `name`
    approval: Literal["auto", "manual"] = "auto"  # manual: an approver runs `registry approve`
    aliases: list[str] = ["challenger"]  # moved to every new version (never `production`)
    force: bool = False  # production despite failed gates: admin only, with a reason
    reason: str | None = None

    @model_validator(mode="after")
    def _force_reason(self) -> PromoteCfg:
        if self.force and not (self.reason or "").strip():
            raise ValueError("promote.force=true needs promote.reason='why' (it is audited)")
        if "production" in self.aliases:
            raise ValueError("promote.aliases must not list 'production': it moves only through "
                             "the gates")
        if self.model is not None and not NAME_RE.match(self.model):
            raise ValueError(f"promote.model={self.model!r}: use letters, digits, '_', '-', '.'")
        return self


class PromoteSections(RegistrySections):
    promote: PromoteCfg = PromoteCfg()


class PromoteJob(TrainJob, EvaluateSections, PromoteSections):
    """jobs.promote: evaluate (when the run's report does not hold) and register."""

    def evaluate_job(self, **changes: object) -> EvaluateJob:
        return view(self, EvaluateJob, **changes)


class RegistryJob(RegistrySections):
    """jobs.registry (conf/registry_cli.yaml)."""
