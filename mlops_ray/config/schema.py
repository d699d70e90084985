"""Pydantic schema of each job's composed config.

Sections that map onto a Ray class use Ray's own argument names, so that
`ScalingConfig(**cfg.scaling.ray_kwargs())` is the whole conversion. Unknown keys are errors
(`extra="forbid"`), and cross-field rules run here, before anything is allocated.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# metrics the training loop reports; gates, early stopping and checkpoint scoring must pick one
TRAIN_METRICS = ("train/loss", "val/loss", "val/auc", "val/accuracy", "epoch", "epochs_done")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class ColumnCheck(Strict):
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None  # allowed values; anything else is a violation
    max_missing: float | None = Field(None, ge=0, le=1)


class SplitCfg(Strict):
    val: float = Field(0.1, gt=0, lt=0.5, description="fraction of the training part")
    test: float = Field(0.2, gt=0, lt=0.5, description="fraction of all rows (unless column)")
    column: str | None = None  # a column that already marks test rows (e.g. Adult's UCI split)
    test_value: str = "test"


class DatasetCfg(Strict):
    name: str
    uri: str  # builtin://adult, a local path, or s3://bucket/key (parquet or csv)
    format: Literal["auto", "parquet", "csv"] = "auto"
    label: str
    positive: Any = 1  # label value meaning the favourable/positive class
    numeric: list[str] = []
    categorical: list[str] = []
    sensitive: list[str] = []
    sensitive_as_features: bool = False
    pii: list[str] = []  # dropped before anything else sees the data
    checks: dict[str, ColumnCheck] = {}
    max_missing: float = Field(0.1, ge=0, le=1)  # default per-column limit
    min_rows: int = Field(100, ge=1)
    split: SplitCfg = SplitCfg()

    @model_validator(mode="after")
    def _columns(self) -> DatasetCfg:
        problems = []
        feats = self.numeric + self.categorical
        if not feats:
            problems.append("dataset.numeric/dataset.categorical: no feature columns declared")
        dup = sorted({c for c in feats if feats.count(c) > 1})
        if dup:
            problems.append(f"dataset: columns listed twice among features: {dup}")
        if self.label in feats:
            problems.append(f"dataset.label='{self.label}' is also listed as a feature")
        for c in self.pii:
            if c in feats or c == self.label or c in self.sensitive:
                problems.append(f"dataset.pii: '{c}' is PII and cannot also be a feature, label "
                                "or sensitive attribute")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def features(self) -> tuple[list[str], list[str]]:
        """(numeric, categorical) model inputs: sensitive columns excluded unless configured."""
        keep = (lambda c: True) if self.sensitive_as_features else (lambda c: c not in self.sensitive)
        return [c for c in self.numeric if keep(c)], [c for c in self.categorical if keep(c)]


class ModelCfg(Strict):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())
    target: str = Field(alias="_target_")

    def spec(self) -> dict[str, Any]:
        return {"_target_": self.target, **(self.model_extra or {})}


class OptimCfg(Strict):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())
    target: str = Field(alias="_target_")
    partial: bool = Field(True, alias="_partial_")
    lr: float = Field(gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)

    def spec(self) -> dict[str, Any]:
        return {"_target_": self.target, "_partial_": True, "lr": self.lr,
                "weight_decay": self.weight_decay, **(self.model_extra or {})}


class ScalingCfg(Strict):
    """Maps one-to-one onto ray.train.ScalingConfig."""
    num_workers: int | tuple[int, int] = 1  # an int, or [min, max] for elastic training
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    accelerator_type: str | None = None
    # elastic runs only: how often Ray Train checks whether more workers could start
    elastic_resize_monitor_interval_s: float = Field(60.0, gt=0)

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"must be >= 1 (or [min, max] with 1 <= min <= max), got {v}")
        return v

    def bounds(self) -> tuple[int, int]:
        return (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) \
            else self.num_workers

    def per_worker(self, key: str) -> float:
        res = self.resources_per_worker or {}
        default = 1.0 if key == "GPU" and self.use_gpu else (1.0 if key == "CPU" else 0.0)
        return float(res.get(key, default))

    def ray_kwargs(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.num_workers, int):  # only elastic runs take the monitor interval
            out.pop("elastic_resize_monitor_interval_s")
        return out


class CheckpointCfg(Strict):
    """Ray's CheckpointConfig arguments plus how often the loop saves one."""
    every_n_epochs: int = Field(1, ge=1)
    every_n_steps: int = Field(0, ge=0)  # also mid-epoch, every N optimizer steps; 0 = off
    num_to_keep: int | None = Field(2, ge=1)
    checkpoint_score_attribute: str | None = "val/auc"
    checkpoint_score_order: Literal["max", "min"] = "max"
    # check ray.train.get_preemption_info() (a barrier) every N steps; 0 = at epoch ends only
    preemption_check_every_n_steps: int = Field(0, ge=0)

    def ray_kwargs(self) -> dict[str, Any]:
        return self.model_dump(include={"num_to_keep", "checkpoint_score_attribute",
                                        "checkpoint_score_order"})


class FailureCfg(Strict):
    """Maps one-to-one onto ray.train.FailureConfig (V2)."""
    max_failures: int = Field(3, ge=-1)  # worker/node errors; -1 = unlimited
    max_preemption_failures: int = Field(-1, ge=-1)  # drained (spot) nodes; budgeted separately
    controller_failure_limit: int = Field(-1, ge=-1)
    relax_collectives_on_preemption: bool = False
    preemption_grace_s: float = Field(0.0, ge=0)

    def ray_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class StorageCfg(Strict):
    uri: str = "outputs"  # local path / file:// URI, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto); else AWS's
    region: str | None = None

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(f"'{v}': scheme '{scheme}://' is not supported (allowed: file://, "
                             "s3://, or a plain local path)")
        return v


class TrackingCfg(Strict):
    backend: Literal["wandb", "none"] = "wandb"
    mode: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE in the env wins
    project: str = "mlops_ray"
    entity: str | None = None


class EarlyStopCfg(Strict):
    metric: str = "val/auc"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(3, ge=1)  # epochs without improvement before stopping; 
    min_delta: float = Field(0.0, ge=0)


class FairnessPenaltyCfg(Strict):
    """In-training mitigation: weight x squared gaps of mean predicted probability between the
    groups of `attribute` (dp: demographic parity; eo: within each label, equalized odds)."""
    kind: Literal["none", "dp", "eo"] = "none"
    weight: float = Field(0.0, ge=0)
    attribute: str | None = None  # default: the dataset's first sensitive attribute


class TrainCfg(Strict):
    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(512, ge=1)  # global: split evenly across workers
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast, GPU only
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    torch_threads: int | None = Field(None, ge=1)  # per worker; default from its CPU share
    early_stopping: EarlyStopCfg | None = EarlyStopCfg()
    fairness_penalty: FairnessPenaltyCfg = FairnessPenaltyCfg()


class RayCfg(Strict):
    address: str | None = None  # None: start a local Ray; "auto" or host:port: connect
    num_cpus: int | None = Field(None, ge=1)  # local cluster only
    num_gpus: int | None = Field(None, ge=0)
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"  # Ray Train's logs
    # exported before Ray starts; Ray Train propagates RAY_TRAIN_* to its controller and workers
    env_vars: dict[str, str] = {}

    @field_validator("env_vars", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:  # `ray.env_vars.X=10` arrives as an int
        return {k: str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()} \
            if isinstance(v, dict) else v


def _check_metric(field: str, value: str | None) -> list[str]:
    if value is not None and value not in TRAIN_METRICS:
        return [f"{field}='{value}' is not a reported metric (allowed: {', '.join(TRAIN_METRICS)})"]
    return []


class ClusterCfg(Strict):
    mode: Literal["local", "remote"] = "local"
    address: str | None = None  # remote: the Jobs API, http://<head>:8265
    working_dir: str = "."
    excludes: list[str] = []
    pip: list[str] | None = None
    python: str = "python"
    env_vars: dict[str, str] = {}
    entrypoint_num_cpus: float = Field(0, ge=0)
    entrypoint_resources: dict[str, float] | None = None
    poll_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _remote(self) -> ClusterCfg:
        if self.mode == "remote" and not (self.address or "").startswith(("http://",
                                                                          "https://")):
            raise ValueError(f"cluster.address={self.address!r}: cluster=remote needs the "
                             "head's Jobs API URL, e.g. http://<head>:8265")
        return self


class PoolPrice(Strict):
    price: float = Field(ge=0)                   # per node-hour as billed (spot: the spot price)
    on_demand: float | None = Field(None, ge=0)  # the same node on demand; None = price


class CostCfg(Strict):
    """Price table for the node-hours in run records (mlops_ray.cluster.cost)."""
    currency: str = "USD"
    sample_s: float = Field(10.0, gt=0)
    pools: dict[str, PoolPrice] = {}
    default: PoolPrice = PoolPrice(price=0.0)


class TrainJobCfg(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    dataset: DatasetCfg
    model: ModelCfg
    optim: OptimCfg
    scaling: ScalingCfg = ScalingCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    failure: FailureCfg = FailureCfg()
    storage: StorageCfg = StorageCfg()
    tracking: TrackingCfg = TrackingCfg()
    ray: RayCfg = RayCfg()
    cluster: ClusterCfg = ClusterCfg()
    cost: CostCfg = CostCfg()
    train: TrainCfg = TrainCfg()
    from_tune: str | None = None  # a tune.json / tuning run URI: train with its best config

    @model_validator(mode="after")
    def _cross(self) -> TrainJobCfg:
        p: list[str] = []
        lo, hi = self.scaling.bounds()
        for n in range(lo, hi + 1):  # every world size an elastic run may have
            if self.train.batch_size % n:
                p.append(f"train.batch_size={self.train.batch_size} is not divisible by "
                         f"scaling.num_workers={n} (the global batch is split evenly)")
        if self.train.batch_size // hi < 1:
            p.append(f"train.batch_size={self.train.batch_size} gives workers an empty batch")
        if self.train.precision == "bf16" and not self.scaling.use_gpu:
            p.append("train.precision='bf16' needs scaling.use_gpu=true (CPU runs use fp32)")
        if self.scaling.use_gpu and self.scaling.per_worker("GPU") <= 0:
            p.append("scaling.use_gpu=true but resources_per_worker.GPU is 0")
        p += _check_metric("checkpoint.checkpoint_score_attribute",
                           self.checkpoint.checkpoint_score_attribute)
        attr = self.checkpoint.checkpoint_score_attribute or ""
        want = "min" if attr.endswith("loss") else "max"
        if attr in TRAIN_METRICS and attr != "epoch" and self.checkpoint.checkpoint_score_order != want:
            p.append(f"checkpoint.checkpoint_score_order='{self.checkpoint.checkpoint_score_order}'"
                     f" keeps the worst checkpoints by {attr} (use '{want}')")
        if self.train.early_stopping and self.train.early_stopping.metric.endswith("loss") \
                and self.train.early_stopping.mode != "min":
            p.append(f"train.early_stopping.mode='{self.train.early_stopping.mode}' for a loss "
                     "(use 'min')")
        if self.train.early_stopping:
            p += _check_metric("train.early_stopping.metric", self.train.early_stopping.metric)
        fp = self.train.fairness_penalty
        if fp.kind != "none" and fp.weight <= 0:
            p.append(f"train.fairness_penalty.kind='{fp.kind}' needs weight > 0 (got {fp.weight})")
        if fp.kind != "none":
            sens = fp.attribute or next(iter(self.dataset.sensitive), None)
            if sens is None or sens not in self.dataset.sensitive:
                p.append(f"train.fairness_penalty.attribute={sens!r} must be one of "
                         f"dataset.sensitive={self.dataset.sensitive}")
        if self.ray.address is None and self.cluster.mode == "local":  # we know what it has
            p += _fits_local(self.scaling, self.ray, workers=hi)
        if p:
            raise ValueError("; ".join(p))
        return self

    def ray_cluster_resources(self) -> dict[str, float]:
        cpus = self.ray.num_cpus or os.cpu_count() or 1
        return {"CPU": float(cpus), "GPU": float(_local_gpus(self.ray))}


def _local_gpus(ray_cfg: RayCfg) -> int:
    if ray_cfg.num_gpus is not None:
        return ray_cfg.num_gpus
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA means no GPUs
        return 0


def _fits_local(scaling: ScalingCfg, ray_cfg: RayCfg, workers: int) -> list[str]:
    p = []
    cpus = ray_cfg.num_cpus or os.cpu_count() or 1
    need_cpu = scaling.per_worker("CPU") * workers
    if need_cpu > cpus + 1e-9:
        p.append(f"scaling: {workers} worker(s) x {scaling.per_worker('CPU')} CPU = {need_cpu} CPUs, "
                 f"but the local Ray cluster has {cpus} (lower scaling.num_workers or "
                 "scaling.resources_per_worker.CPU, or connect to a cluster with ray.address)")
    gpu_each = scaling.per_worker("GPU")
    if gpu_each > 0:
        gpus = _local_gpus(ray_cfg)
        if gpu_each > gpus or (scaling.use_gpu and gpu_each * workers > gpus):
            p.append(f"scaling: {workers} worker(s) x {gpu_each} GPU needs {gpu_each * workers} "
                     f"GPUs (at least {math.ceil(gpu_each)} on one node), but this machine has "
                     f"{gpus} (set scaling.use_gpu=false, or connect to a GPU cluster with "
                     "ray.address)")
    return p


# ---------------------------------------------------------------------------------------------
# jobs.tune


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

    def backend(self, workers: int) -> str:
        if self.trial_backend == "auto":
            return "function" if workers == 1 else "train"
        return self.trial_backend


class DbCfg(Strict):
    url: str | None = None  # SQLAlchemy URL; None: a SQLite file in the local output folder


class TuneJobCfg(TrainJobCfg):
    space: dict[str, ParamSpec]
    search: SearchCfg = SearchCfg()
    scheduler: SchedulerCfg = SchedulerCfg()
    tune: TuneCfg = TuneCfg()
    db: DbCfg = DbCfg()

    @model_validator(mode="after")
    def _tune_cross(self) -> TuneJobCfg:
        p: list[str] = []
        base = self.model_dump(by_alias=True, exclude={"space", "search", "scheduler", "tune", "db"})
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
        if self.tune.trial_backend == "function" and self.scaling.bounds()[1] > 1:
            p.append(f"tune.trial_backend='function' runs 1 worker per trial, but "
                     f"scaling.num_workers={self.scaling.num_workers} (use 'train' or 'auto')")
        if self.tune.backend(self.scaling.bounds()[1]) == "train" and self.scheduler.name == "asha":
            # Ray 2.60: Tune stops an ASHA loser by killing its driver; the Train controller's
            # worker placement group belongs to the tuning job and stays reserved, so later
            # trials wait for its CPUs forever.
            p.append("scheduler=asha with TorchTrainer trials (tune.trial_backend=train or "
                     "scaling.num_workers>1) would leak each stopped trial's worker placement "
                     "group in Ray 2.60 and stall the study: use scheduler=fifo")
        if self.tune.metric not in TRAIN_METRICS:
            p.append(f"tune.metric='{self.tune.metric}' is not a reported metric (allowed: "
                     f"{', '.join(TRAIN_METRICS)})")
        lo, hi = self.scaling.bounds()
        per_trial = hi * self.scaling.per_worker("CPU") + (
            self.tune.driver_resources.get("CPU", 0) if self.tune.backend(hi) == "train" else 0)
        cpus = self.tune.cluster_cpus or (
            self.ray.num_cpus or os.cpu_count() or 1
            if self.ray.address is None and self.cluster.mode == "local" else None)
        want = self.tune.max_concurrent_trials * per_trial
        if cpus is not None and want > cpus + 1e-9:
            p.append(f"tune.max_concurrent_trials={self.tune.max_concurrent_trials} x {hi} "
                     f"worker(s) x {self.scaling.per_worker('CPU')} CPU needs {want:g} CPUs, but "
                     f"the cluster has {cpus} (lower tune.max_concurrent_trials or the workers, "
                     "or set tune.cluster_cpus to the autoscaler's limit)")
        if self.scheduler.max_t is not None and self.scheduler.max_t > self.train.epochs:
            p.append(f"scheduler.max_t={self.scheduler.max_t} exceeds train.epochs="
                     f"{self.train.epochs}")
        if p:
            raise ValueError("; ".join(p))
        return self


# ---------------------------------------------------------------------------------------------
# jobs.evaluate


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
    cpus_per_fold: float = Field(1.0, gt=0)


class ThresholdCfg(Strict):
    objective: Literal["f1", "youden", "accuracy"] = "f1"


class FairnessCfg(Strict):
    attributes: list[str] | None = None
    min_group_size: int = Field(30, ge=1)
    n_boot: int = Field(200, ge=10)
    mitigation: Literal["none", "threshold"] = "threshold"
    constraint: Literal["demographic_parity", "equalized_odds"] = "equalized_odds"
    mitigation_attribute: str | None = None


class EvaluateJobCfg(TrainJobCfg):
    run: str
    champion: str | None = None
    cv: CvCfg = CvCfg()
    threshold: ThresholdCfg = ThresholdCfg()
    fairness: FairnessCfg = FairnessCfg()
    gates: GatesCfg
    n_boot: int = Field(500, ge=10)


# jobs.promote / jobs.registry

class RegistryCfg(Strict):
    policy: str | None = None  # YAML policy file; None: the local OS user is admin


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
        if self.model is not None and not _NAME_RE.match(self.model):
            raise ValueError(f"promote.model={self.model!r}: use letters, digits, '_', '-', '.'")
        return self


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class PromoteJobCfg(EvaluateJobCfg):
    db: DbCfg = DbCfg()
    registry: RegistryCfg = RegistryCfg()
    promote: PromoteCfg = PromoteCfg()


class RegistryJobCfg(Strict):
    storage: StorageCfg = StorageCfg()
    db: DbCfg = DbCfg()
    registry: RegistryCfg = RegistryCfg()


# jobs.serve

class ServeDeploymentCfg(Strict):
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    ray_actor_options: dict[str, Any] = {"num_cpus": 0.25}
    autoscaling_config: dict[str, Any] | None = None
    chaos_error_rate: float = Field(0.0, ge=0, le=1)


class BatchingCfg(Strict):
    max_batch_size: int = Field(64, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)


class LimitsCfg(Strict):
    max_rows: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1048576, ge=1024)
    unknown_categories: Literal["allow", "reject"] = "allow"


class CacheCfg(Strict):
    enabled: bool = True
    max_entries: int = Field(10000, ge=1)
    ttl_s: float = Field(300, gt=0)


class AuthCfg(Strict):
    api_keys: list[str] = []
    api_keys_env: str | None = "MLOPS_RAY_SERVE_API_KEYS"
    key_file: str | None = None


class DriftCfg(Strict):
    window: int = Field(1000, ge=10)
    min_rows: int = Field(200, ge=10)
    check_interval_s: float = Field(5, gt=0)
    psi_threshold: float = Field(0.2, gt=0)
    js_threshold: float = Field(0.15, gt=0, le=1)
    p_value: float = Field(0.01, gt=0, lt=1)
    webhook_url: str | None = None


class FeedbackCfg(Strict):
    window: int = Field(5000, ge=10)
    max_pending: int = Field(10000, ge=10)


class RolloutCfg(Strict):
    strategy: Literal["canary", "bluegreen", "ab", "shadow"] = "canary"
    steps: list[int] = [10, 50, 100]
    bake_s: float = Field(30, ge=0)
    poll_s: float = Field(0.5, gt=0)
    min_requests: int = Field(20, ge=1)  # a step also waits for these, up to max_bake_s
    max_bake_s: float = Field(600, gt=0)
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_p99_ms: float = Field(250, gt=0)
    max_prediction_shift: float = Field(0.1, ge=0, le=1)
    ab_weights: list[float] = [50, 50]
    ab_key: str | None = None

    @model_validator(mode="after")
    def _steps(self) -> RolloutCfg:
        if not self.steps or any(not 0 < s <= 100 for s in self.steps) \
                or self.steps != sorted(self.steps):
            raise ValueError(f"serve.rollout.steps={self.steps}: increasing percentages in "
                             "(0, 100]")
        if self.max_bake_s < self.bake_s:
            raise ValueError(f"serve.rollout.max_bake_s={self.max_bake_s} is below "
                             f"bake_s={self.bake_s}")
        if len(self.ab_weights) != 2 or min(self.ab_weights) < 0 or sum(self.ab_weights) <= 0:
            raise ValueError(f"serve.rollout.ab_weights={self.ab_weights}: two weights >= 0")
        return self


class GrpcCfg(Strict):
    enabled: bool = False
    port: int = Field(9000, ge=1, le=65535)
    servicer_functions: list[str] = [
        "mlops_ray.serving.proto.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"]


class ServeCfg(Strict):
    app_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    detach: bool = False
    keep_alive: bool = True  # jobs.pipeline on a local Ray: serve until Ctrl-C (false: exit)
    ready_timeout_s: float = Field(180, gt=0)
    ingress_mode: Literal["inline", "handle"] = "inline"
    access_log: bool = False
    ingress: ServeDeploymentCfg = ServeDeploymentCfg(max_ongoing_requests=256)
    model: ServeDeploymentCfg = ServeDeploymentCfg()
    batching: BatchingCfg = BatchingCfg()
    limits: LimitsCfg = LimitsCfg()
    cache: CacheCfg = CacheCfg()
    auth: AuthCfg = AuthCfg()
    drift: DriftCfg = DriftCfg()
    feedback: FeedbackCfg = FeedbackCfg()
    rollout: RolloutCfg = RolloutCfg()
    grpc: GrpcCfg = GrpcCfg()

    @model_validator(mode="after")
    def _serve(self) -> ServeCfg:
        for part in ("ingress", "model"):
            auto = getattr(self, part).autoscaling_config
            if auto is None:
                continue
            from ray.serve.config import AutoscalingConfig
            try:
                AutoscalingConfig(**auto)
            except Exception as e:  # noqa: BLE001 - Ray's own validation names the field
                raise ValueError(f"serve.{part}.autoscaling_config: {e}") from None
        if self.model.autoscaling_config and self.ingress_mode == "inline":
            raise ValueError("serve.model.autoscaling_config scales the model deployments, "
                             "which serve.ingress_mode=inline does not use: set "
                             "serve.ingress_mode=handle, or serve.ingress.autoscaling_config")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix={self.route_prefix!r}: must start with '/'")
        if self.grpc.enabled and not self.grpc.servicer_functions:
            raise ValueError("serve.grpc.enabled=true needs serve.grpc.servicer_functions")
        return self


class ServeJobCfg(Strict):
    model: str
    alias: str = "production"
    to: str | None = None
    out: str | None = None  # export: the Serve config file to write (None: stdout)
    strategy: Literal["canary", "bluegreen", "ab", "shadow"] | None = None
    serve: ServeCfg = ServeCfg()
    storage: StorageCfg = StorageCfg()
    db: DbCfg = DbCfg()
    registry: RegistryCfg = RegistryCfg()
    ray: RayCfg = RayCfg()

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use letters, digits, '_', '-', '.' (a registry model name)")
        return v


# jobs.pipeline / jobs.monitor

Stage = Literal["train", "evaluate", "promote", "deploy", "smoke"]
PIPELINE_STAGES: tuple[Stage, ...] = ("train", "evaluate", "promote", "deploy", "smoke")


class PipelineTuneCfg(TuneCfg):
    enabled: bool = False  # tune=true: a study instead of one training run


class SmokeCfg(Strict):
    rows: int = Field(200, ge=1)


class PipelineJobCfg(PromoteJobCfg):
    run: str | None = None  # type: ignore[assignment]  # optional here: train makes it
    stages: list[Stage] = list(PIPELINE_STAGES)
    trigger: str | None = None
    tune: PipelineTuneCfg = PipelineTuneCfg()
    space: dict[str, ParamSpec] = {}
    search: SearchCfg = SearchCfg()
    scheduler: SchedulerCfg = SchedulerCfg()
    smoke: SmokeCfg = SmokeCfg()
    serve: ServeCfg = ServeCfg()

    @model_validator(mode="after")
    def _pipeline_cross(self) -> PipelineJobCfg:
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
        if self.tune.enabled:
            if not self.space:
                p.append("tune=true needs a search space (conf/space/<experiment>.yaml)")
            else:  # the study's own cross-checks (CPU fit, ASHA + Train trials, metric)
                t = self.model_dump(by_alias=True)
                t["tune"] = {k: v for k, v in t["tune"].items() if k != "enabled"}
                t["train"] = {**t["train"], "early_stopping": None}
                try:
                    TuneJobCfg.model_validate({k: v for k, v in t.items()
                                               if k in TuneJobCfg.model_fields})
                except ValueError as e:
                    p.append(f"tune=true: {e}")
        if p:
            raise ValueError("; ".join(p))
        return self


class MonitorCfg(Strict):
    new_data: str = Field(min_length=1)
    interval_s: float = Field(30, gt=0)
    once: bool = False
    max_drifted_features: int = Field(1, ge=0)
    min_live_auc: float | None = Field(None, gt=0, le=1)
    min_labelled_rows: int = Field(200, ge=1)
    canary_max_prediction_shift: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _some_trigger(self) -> MonitorCfg:
        if not self.max_drifted_features and self.min_live_auc is None:
            raise ValueError("monitor: nothing to watch (set max_drifted_features >= 1 or "
                             "min_live_auc)")
        return self


class MonitorJobCfg(PipelineJobCfg):
    monitor: MonitorCfg


# jobs.export

_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(@[A-Za-z0-9][A-Za-z0-9_.-]{0,127}|:\d+)?$")


def registry_ref(v: str) -> str:
    """A registry ref (name@alias, name:VERSION, or a bare name meaning name@production)."""
    if not _REF_RE.match(v):
        raise ValueError("expected a registry ref: name@alias, name:VERSION or name "
                         "(letters, digits, '_', '-', '.')")
    return v if ("@" in v or ":" in v) else f"{v}@production"


class ExportJobCfg(Strict):
    model: str  # registry ref: name@alias, name:VERSION, or name (= name@production)
    format: Literal["onnx", "torchscript"] = "onnx"
    out: str | None = None  # bundle folder (path or s3://); None: <storage.uri>/exports/<name>
    storage: StorageCfg = StorageCfg()
    db: DbCfg = DbCfg()
    registry: RegistryCfg = RegistryCfg()

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return registry_ref(v)


# jobs.predict

class PredictDriftCfg(Strict):
    """Same meaning as serve.drift: a feature alerts when its effect size (PSI / JS) and its
    chi-squared p-value both cross these."""
    psi_threshold: float = Field(0.2, gt=0)
    js_threshold: float = Field(0.15, gt=0, le=1)
    p_value: float = Field(0.01, gt=0, lt=1)


class PredictCfg(Strict):
    batch_size: int = Field(4096, ge=1)  # rows per map_batches call
    concurrency: int | list[int] = 2  # scoring actors: N, or [min, max] (autoscaling pool)
    num_cpus: float = Field(0.5, gt=0)  # per actor (fractions pack actors onto cores)
    id_column: str | None = None  # None: source_file + source_row identify each row
    format: Literal["auto", "parquet", "csv"] = "auto"  # of the input
    rows_per_file: int = Field(1_000_000, ge=1)  # rows a write task gathers per output part
    object_store_mb: int | None = Field(None, ge=16)  # Ray Data's budget for blocks in flight
    drift: PredictDriftCfg = PredictDriftCfg()

    @field_validator("concurrency")
    @classmethod
    def _pool(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1 or isinstance(v, list) and (
                len(v) != 2 or v[0] < 1 or v[0] > v[1]):
            raise ValueError("scoring actors: a count >= 1, or [min, max] with 1 <= min <= max")
        return v

    def min_actors(self) -> int:
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[0]


class PredictJobCfg(Strict):
    model: str  # registry ref: name@alias, name:VERSION, or name (= name@production)
    input: str  # .parquet/.pq/.csv(.gz) file or a folder of them; local path, file:// or s3://
    output: str  # folder (local path, file:// or s3://): predictions/, drift_report.json, _SUCCESS
    predict: PredictCfg = PredictCfg()
    storage: StorageCfg = StorageCfg()
    db: DbCfg = DbCfg()
    registry: RegistryCfg = RegistryCfg()
    ray: RayCfg = RayCfg()

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return registry_ref(v)

    @field_validator("input", "output")
    @classmethod
    def _uri(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(f"scheme '{scheme}://' is not supported (allowed: file://, s3://, "
                             "or a plain local path)")
        return v

    @model_validator(mode="after")
    def _fits_local(self) -> PredictJobCfg:
        if self.ray.address is None:  # a local cluster: the pool must fit, reads need a core
            cpus = self.ray.num_cpus or os.cpu_count() or 1
            need = self.predict.min_actors() * self.predict.num_cpus
            if need > cpus:
                raise ValueError(f"predict.concurrency={self.predict.concurrency} x "
                                 f"predict.num_cpus={self.predict.num_cpus} needs {need:g} CPUs; "
                                 f"the local cluster has {cpus} (lower either, or set "
                                 "ray.num_cpus)")
        return self


# ---------------------------------------------------------------------------------------------
# jobs.train, task=lm: a decoder-only transformer on a synthetic token stream (throughput work)

# what the LM loop reports (every lm.log_every_n_steps steps; val/loss at epoch ends)
LM_METRICS = ("train/loss", "val/loss", "step", "epoch", "epochs_done", "perf/tokens_per_s",
              "perf/step_ms", "perf/tflops", "perf/mfu")


class SyntheticTokensCfg(Strict):
    """mlops_ray.models.synthetic.SyntheticTokens: batches are a pure function of (seed, step)."""
    name: str = "synthetic_tokens"
    uri: Literal["synthetic://tokens"] = "synthetic://tokens"
    noise: float = Field(0.1, ge=0, le=1)  # chance a position jumps to a random token


class GptModelCfg(Strict):
    """`_target_(size, checkpointing=..., **overrides)` -> a module with forward(idx, targets)
    -> (logits, loss), num_params() and flops_per_token(): mlops_ray.models.gpt.build_gpt."""
    target: str = Field("mlops_ray.models.gpt.build_gpt", alias="_target_")
    size: str = "tiny"
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_embd: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1)  # sequence length
    vocab_size: int | None = Field(None, ge=2)
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool | None = None

    @model_validator(mode="after")
    def _size(self) -> GptModelCfg:
        if self.target != "mlops_ray.models.gpt.build_gpt":
            return self
        from mlops_ray.models.gpt import SIZES  # torch, only when this schema is used
        if self.size not in SIZES:
            raise ValueError(f"model.size={self.size!r}: allowed {', '.join(sorted(SIZES))}")
        n_embd = self.n_embd or SIZES[self.size]["n_embd"]
        n_head = self.n_head or SIZES[self.size]["n_head"]
        if n_embd % n_head:
            raise ValueError(f"model: n_embd={n_embd} is not divisible by n_head={n_head}")
        return self

    def dims(self) -> dict[str, Any]:
        """The architecture fields given (None: the size's own)."""
        return self.model_dump(exclude={"target", "size"}, exclude_none=True)

    def spec(self) -> dict[str, Any]:
        return {"_target_": self.target, "size": self.size, **self.dims()}


class LmCfg(Strict):
    """Options of the LM loop (mlops_ray/train/lm_loop.py); conf/lm/{default,gpu}.yaml."""
    steps_per_epoch: int = Field(20, ge=1)  # the stream is endless: total = train.epochs x this
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 = off
    lr_warmup_steps: int = Field(0, ge=0)  # linear warm-up, then train.lr_schedule
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    fused_optimizer: bool = False
    activation_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions (CUDA only)
    pin_memory: bool = True  # page-locked host batches (CUDA only)
    non_blocking: bool = True  # asynchronous host-to-device copies on a side stream (CUDA only)
    prefetch: int = Field(2, ge=0)  # batches a background thread makes ahead; 0 = inline
    log_every_n_steps: int = Field(10, ge=1)
    warmup_steps: int = Field(5, ge=0)  # first steps left out of the steady-state throughput
    val_batches: int = Field(2, ge=1)  # held-out batches for val/loss at each epoch end
    # dense bf16 peak TFLOP/s by a substring of the GPU's name (longest match wins), merged over
    # mlops_ray.perf.PEAK_TFLOPS; the override wins over both
    peak_tflops: dict[str, float] = {}
    peak_tflops_override: float | None = Field(None, gt=0)


class LmTrainJobCfg(Strict):
    """jobs.train with `task: lm` (conf/experiment/gpt_synthetic.yaml). The tabular sections
    keep their meaning where one exists: train.batch_size is the global batch in sequences per
    optimizer step, train.epochs x lm.steps_per_epoch the number of steps, checkpoint.* and
    scaling.* as for any run."""
    task: Literal["lm"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    dataset: SyntheticTokensCfg = SyntheticTokensCfg()
    model: GptModelCfg = GptModelCfg()
    optim: OptimCfg
    lm: LmCfg = LmCfg()
    scaling: ScalingCfg = ScalingCfg()
    checkpoint: CheckpointCfg = CheckpointCfg(checkpoint_score_attribute="val/loss",
                                              checkpoint_score_order="min")
    failure: FailureCfg = FailureCfg()
    storage: StorageCfg = StorageCfg()
    tracking: TrackingCfg = TrackingCfg()
    ray: RayCfg = RayCfg()
    cluster: ClusterCfg = ClusterCfg()
    cost: CostCfg = CostCfg()
    train: TrainCfg = TrainCfg(early_stopping=None)
    from_tune: str | None = None  # accepted so the composed train.yaml validates; must be null

    def total_steps(self) -> int:
        return self.train.epochs * self.lm.steps_per_epoch

    @model_validator(mode="after")
    def _lm_cross(self) -> LmTrainJobCfg:
        p: list[str] = []
        lo, hi = self.scaling.bounds()
        accum = self.lm.grad_accum_steps
        for n in range(lo, hi + 1):
            if self.train.batch_size % (n * accum):
                p.append(f"train.batch_size={self.train.batch_size} is not divisible by "
                         f"scaling.num_workers={n} x lm.grad_accum_steps={accum} (each worker "
                         "runs batch_size / (workers x accum) sequences per micro-batch)")
        if self.train.precision == "bf16" and not self.scaling.use_gpu:
            p.append("train.precision='bf16' needs scaling.use_gpu=true: the bf16 figures are "
                     "GPU tensor-core figures, and CPU runs use fp32")
        if self.scaling.use_gpu and self.scaling.per_worker("GPU") <= 0:
            p.append("scaling.use_gpu=true but resources_per_worker.GPU is 0")
        if not self.lm.compile and self.lm.compile_mode != "default":
            p.append(f"lm.compile_mode='{self.lm.compile_mode}' has no effect with "
                     "lm.compile=false (set lm.compile=true)")
        if self.lm.warmup_steps >= self.total_steps():
            p.append(f"lm.warmup_steps={self.lm.warmup_steps} leaves no timed steps: it must be "
                     f"below train.epochs x lm.steps_per_epoch = {self.total_steps()}")
        if self.lm.strategy == "fsdp":
            try:
                from torch.distributed.fsdp import fully_shard  # noqa: F401
            except ImportError:
                p.append("lm.strategy='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, "
                         "torch >= 2.6); use lm.strategy=ddp")
        # FSDP with one worker is allowed: it shards nothing, and is how the FSDP code path
        # (fully_shard, sharded state dicts) is exercised on a single GPU.
        attr = self.checkpoint.checkpoint_score_attribute
        if attr is not None and attr not in LM_METRICS:
            p.append(f"checkpoint.checkpoint_score_attribute='{attr}' is not reported by task=lm "
                     f"(allowed: {', '.join(LM_METRICS)})")
        if attr and attr.endswith("loss") and self.checkpoint.checkpoint_score_order != "min":
            p.append(f"checkpoint.checkpoint_score_order='{self.checkpoint.checkpoint_score_order}'"
                     f" keeps the worst checkpoints by {attr} (use 'min')")
        es = self.train.early_stopping
        if es is not None and (es.metric not in ("train/loss", "val/loss") or es.mode != "min"):
            p.append(f"train.early_stopping: metric='{es.metric}' mode='{es.mode}'; task=lm "
                     "stops on train/loss or val/loss with mode='min' (or set it to null)")
        if self.train.fairness_penalty.kind != "none":
            p.append("train.fairness_penalty applies to tabular classifiers: task=lm has no "
                     "groups (set train.fairness_penalty.kind=none)")
        if self.from_tune is not None:
            p.append(f"from_tune={self.from_tune!r}: tuning runs are tabular; task=lm trains "
                     "from its own config (set from_tune=null)")
        if self.ray.address is None and self.cluster.mode == "local":
            p += _fits_local(self.scaling, self.ray, workers=hi)
        if p:
            raise ValueError("; ".join(p))
        return self


def train_job_schema(cfg: Any) -> type[TrainJobCfg] | type[LmTrainJobCfg]:
    """The schema jobs.train validates a composed config (dict or DictConfig) against."""
    return LmTrainJobCfg if cfg.get("task") == "lm" else TrainJobCfg
