"""jobs.tune: the search space (data), the search algorithm, the scheduler, the `tune:` block
and the study database; `TuneJob` = the train job + these sections (conf/tune.yaml)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mlops_ray.config.base import DbCfg, Strict, problems
from mlops_ray.config.evaluate import FairnessCfg, GatesCfg, ThresholdCfg
from mlops_ray.config.train import TRAIN_METRICS, TrainJob


class ParamSpec(Strict):
    """One search dimension, keyed in `space` by its dotted path in the train config."""
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None  # conditional: sample only when {param: value} holds

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"low={self.low} must be < high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("log=true cannot be combined with step")
        return self


class SearchCfg(Strict):
    algorithm: Literal["tpe", "random", "cmaes"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(4, ge=0)  # TPE: random trials before the model kicks in


class SchedulerCfg(Strict):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs every trial gets
    reduction_factor: float = Field(3, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: train.epochs


class TuneCfg(Strict):
    num_samples: int = Field(12, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    metric: str = "val/auc"
    mode: Literal["max", "min"] = "max"
    max_failures: int = Field(2, ge=-1)  # Tune's trial-level retries (on top of Train's)
    include_defaults: bool = True  # first trial = the train config's own values (if in the space)
    # function: the loop runs as a plain Tune function trial (1 worker, no Train start-up);
    # train: each trial is a TorchTrainer run (1..N workers); auto: function when 1 worker
    trial_backend: Literal["auto", "train", "function"] = "auto"
    # Tune resources of each trial's driver (train backend), e.g. {TRAIN_DRIVER: 0.01} to keep
    # drivers on on-demand nodes
    driver_resources: dict[str, float] = {"CPU": 0.01}
    cluster_cpus: int | None = Field(None, ge=1)  # for the fit check on a remote cluster
    # the promotion gates as Optuna constraints, estimated on each trial's validation rows
    # (evaluation/feasibility.py); the study's best is its best feasible trial
    gate_aware: bool = True
    gate_min_group_rows: int = Field(100, ge=1)  # smaller validation groups: not constrained
    # bootstrap resamples of the estimated CIs (null: fairness.n_boot, as the evaluation)
    gate_n_boot: int | None = Field(None, ge=10)

    def backend(self, workers: int) -> str:
        if self.trial_backend == "auto":
            return "function" if workers == 1 else "train"
        return self.trial_backend


class TuneSections(Strict):
    space: dict[str, ParamSpec]
    search: SearchCfg = SearchCfg()
    scheduler: SchedulerCfg = SchedulerCfg()
    tune: TuneCfg = TuneCfg()
    db: DbCfg = DbCfg()
    # what the evaluation will judge (conf/gates, and the threshold / fairness of _judging.yaml)
    gates: GatesCfg | None = None
    threshold: ThresholdCfg = ThresholdCfg()
    fairness: FairnessCfg = FairnessCfg()


TUNE_KEYS = tuple(TuneSections.model_fields)


class TuneJob(TrainJob, TuneSections):
    """jobs.tune: a train job and how to search around it."""

    @model_validator(mode="after")
    def _tune_cross(self) -> TuneJob:
        p: list[str] = []
        base = self.train_job().plain()
        names = list(self.space)
        for i, (key, spec) in enumerate(self.space.items()):
            node: Any = base
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    p.append(f"space.{key}: unknown parameter (not a key of the train config)")
                    break
                node = node[part]
            if spec.when:
                for dep in spec.when:
                    if dep not in names[:i]:
                        p.append(f"space.{key}.when: '{dep}' must be a parameter listed before it")
        hi = self.scaling.bounds()[1]
        if self.tune.trial_backend == "function" and hi > 1:
            p.append(f"tune.trial_backend='function' runs 1 worker per trial, but "
                     f"scaling.num_workers={self.scaling.num_workers} (use 'train' or 'auto')")
        if self.tune.backend(hi) == "train" and self.scheduler.name == "asha":
            # Ray 2.60: Tune stops an ASHA loser by killing its driver; the Train controller's
            # worker placement group belongs to the tuning job and stays reserved, so later
            # trials wait for its CPUs forever.
            p.append("scheduler=asha with TorchTrainer trials (tune.trial_backend=train or "
                     "scaling.num_workers>1) would leak each stopped trial's worker placement "
                     "group in Ray 2.60 and stall the study: use scheduler=fifo")
        if self.tune.metric not in TRAIN_METRICS:
            p.append(f"tune.metric='{self.tune.metric}' is not a reported metric (allowed: "
                     f"{', '.join(TRAIN_METRICS)})")
        per_trial = hi * self.scaling.per_worker("CPU") + (
            self.tune.driver_resources.get("CPU", 0) if self.tune.backend(hi) == "train" else 0)
        cpus = self.tune.cluster_cpus or (
            self.ray.local_cpus() if self.ray.address is None and self.cluster.mode == "local"
            else None)
        want = self.tune.max_concurrent_trials * per_trial
        if cpus is not None and want > cpus + 1e-9:
            p.append(f"tune.max_concurrent_trials={self.tune.max_concurrent_trials} x {hi} "
                     f"worker(s) x {self.scaling.per_worker('CPU')} CPU needs {want:g} CPUs, but "
                     f"the cluster has {cpus} (lower tune.max_concurrent_trials or the workers, "
                     "or set tune.cluster_cpus to the autoscaler's limit)")
        if self.scheduler.max_t is not None and self.scheduler.max_t > self.reports():
            p.append(f"scheduler.max_t={self.scheduler.max_t} exceeds the reports a trial "
                     f"makes ({self.reports()}: " + ("model.num_boost_round / "
                                                      "model.rounds_per_report)" if
                                                      self.is_trees() else "train.epochs)"))
        problems(p)
        return self

    def train_job(self) -> TrainJob:
        """The train config the trials start from (what `space` keys point into)."""
        return TrainJob.model_construct(**{k: getattr(self, k) for k in TrainJob.model_fields})

    def reports(self) -> int:
        """How many reports (epochs of the run record) a full trial makes."""
        if self.is_trees():
            spec = self.model.spec()
            return -(-int(spec["num_boost_round"]) // int(spec["rounds_per_report"]))
        return self.train.epochs

    def max_t(self) -> int:
        return self.scheduler.max_t or self.reports()
