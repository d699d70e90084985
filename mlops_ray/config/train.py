"""jobs.train: the sections of a training run, and the tabular job (conf/train.yaml).

`RunSections` is what every training run has (the language-model job in `config.lm` too):
scaling, checkpoints, failures, storage, tracking, Ray, cluster, cost and the train loop's own
knobs. `TrainJob` adds the tabular data, model and optimizer.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mlops_ray.config.base import (
    ClusterCfg,
    CostCfg,
    RayCfg,
    StorageCfg,
    Strict,
    TrackingCfg,
    fits_local,
    problems,
)
from mlops_ray.config.features import FeastCfg, check_dataset
from mlops_ray.utils import stable_hash

# metrics the training loop reports; gates, early stopping and checkpoint scoring must pick one
TRAIN_METRICS = ("train/loss", "val/loss", "val/auc", "val/accuracy", "epoch", "epochs_done")
# sections that change where or how a run executes, not what it computes
NOT_HASHED = ("storage", "tracking", "ray", "cluster", "cost", "failure", "checkpoint",
              "from_tune")


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
    # where the rows came from when a job assembled the table (jobs.monitor: prediction-log
    # parts, label parts, cutoff, mixing rule); copied into the version's lineage.json
    sources: dict[str, Any] = {}
    # features from a Feast store, joined point in time to the entity frame at `uri`
    feast: FeastCfg | None = None

    @model_validator(mode="after")
    def _columns(self) -> DatasetCfg:
        p = []
        feats = self.numeric + self.categorical
        p += check_dataset(self.feast, self.label, feats, self.sensitive)
        if not feats:
            p.append("dataset.numeric/dataset.categorical: no feature columns declared")
        dup = sorted({c for c in feats if feats.count(c) > 1})
        if dup:
            p.append(f"dataset: columns listed twice among features: {dup}")
        if self.label in feats:
            p.append(f"dataset.label='{self.label}' is also listed as a feature")
        for c in self.pii:
            if c in feats or c == self.label or c in self.sensitive:
                p.append(f"dataset.pii: '{c}' is PII and cannot also be a feature, label or "
                         "sensitive attribute")
        problems(p)
        return self

    def features(self) -> tuple[list[str], list[str]]:
        """(numeric, categorical) model inputs: sensitive columns excluded unless configured."""
        keep = (lambda c: True) if self.sensitive_as_features else (lambda c: c not in self.sensitive)
        return [c for c in self.numeric if keep(c)], [c for c in self.categorical if keep(c)]


def hashed_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    """What of a dataset section names its rows (run names, study names, reuse keys): optional
    sections left empty are left out, as before they existed, so earlier runs keep their names
    and resume; of a feature store only what the join depends on (not where the online store
    or the stream are, nor how serving answers an unknown entity)."""
    out = {k: v for k, v in dataset.items() if not (k in ("sources", "feast") and not v)}
    if out.get("feast"):
        out["feast"] = {k: v for k, v in out["feast"].items()
                        if k not in ("online", "stream", "path", "on_missing")}
    return out


class ModelCfg(Strict):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())
    target: str = Field(alias="_target_")

    def spec(self) -> dict[str, Any]:
        return {"_target_": self.target, **(self.model_extra or {})}


# mlops_ray.models.trees.TARGET (config does not import the models: torch)
TREES_TARGET = "mlops_ray.models.trees.Trees"


class TreesCfg(Strict):
    """`model=xgboost` / `model=lightgbm`: the booster's parameters under portable names
    (train/tasks/trees.py maps them onto the library's). Metrics every rounds_per_report
    rounds, a checkpoint every checkpoint_every_n_rounds (checkpoint.every_n_epochs is the
    MLP's). Early stopping waits `early_stopping_rounds` (null: off) on train.early_stopping's
    metric and mode, or on val/loss when that is null (as in tuning, where ASHA stops the
    MLP's trials instead)."""
    target: str = Field(alias="_target_")
    library: Literal["xgboost", "lightgbm"]
    num_boost_round: int = Field(1000, ge=1, le=100_000)
    learning_rate: float = Field(0.05, gt=0, le=1)
    max_depth: int = Field(6, ge=-1, le=64)  # lightgbm: -1 = no limit
    min_child_weight: float = Field(1.0, ge=0)  # xgboost
    num_leaves: int = Field(31, ge=2, le=131_072)  # lightgbm
    min_child_samples: int = Field(20, ge=1)  # lightgbm
    subsample: float = Field(1.0, gt=0, le=1)  # row sampling per round
    colsample_bytree: float = Field(1.0, gt=0, le=1)  # feature sampling per tree
    reg_lambda: float = Field(1.0, ge=0)
    reg_alpha: float = Field(0.0, ge=0)
    max_bin: int = Field(256, ge=2, le=65_535)
    early_stopping_rounds: int | None = Field(50, ge=1)
    # one report (an "epoch" of the run record); Ray Train takes a report per controller poll
    # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): faster reports wait for it
    rounds_per_report: int = Field(100, ge=1)
    checkpoint_every_n_rounds: int = Field(200, ge=1)  # a multiple of rounds_per_report

    @model_validator(mode="after")
    def _every(self) -> TreesCfg:
        if self.checkpoint_every_n_rounds % self.rounds_per_report:
            raise ValueError(f"checkpoint_every_n_rounds={self.checkpoint_every_n_rounds} must "
                             f"be a multiple of rounds_per_report={self.rounds_per_report}")
        return self


class OptimCfg(Strict):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())
    target: str = Field(alias="_target_")
    partial: bool = Field(True, alias="_partial_")
    lr: float = Field(gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)

    def spec(self) -> dict[str, Any]:
        """The builder spec the loop instantiates (always partial: it gets the parameters)."""
        return {**self.model_dump(by_alias=True), "_partial_": True}


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
        """`ScalingConfig(**this)`."""
        out = self.model_dump(exclude_none=True)
        if isinstance(self.num_workers, int):  # only elastic runs take the monitor interval
            out.pop("elastic_resize_monitor_interval_s")
        else:
            out["num_workers"] = tuple(self.num_workers)
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
        """`CheckpointConfig(**this)`."""
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
        """`FailureConfig(**this)`."""
        return self.model_dump()


class EarlyStopCfg(Strict):
    metric: str = "val/auc"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(3, ge=1)  # epochs without improvement before stopping
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


def check_metric(field: str, value: str | None, allowed: tuple[str, ...] = TRAIN_METRICS
                 ) -> list[str]:
    if value is not None and value not in allowed:
        return [f"{field}='{value}' is not a reported metric (allowed: {', '.join(allowed)})"]
    return []


class RunSections(Strict):
    """The sections of any training run (tabular here, `task: lm` in config.lm)."""
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
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

    @classmethod
    def stored(cls, cfg: dict[str, Any]) -> Any:
        """A finished run's config (its run.json) as the job it was: its sections are checked
        again, not what depends on the machine it ran on (e.g. whether it fits this one)."""
        return cls.model_validate(cfg, context={"stored": True})

    def config_hash(self) -> str:
        """12 hex of what the run computes (data, model, optim, scaling, train, seed)."""
        cfg = {k: v for k, v in self.plain().items() if k not in NOT_HASHED}
        if isinstance(cfg.get("dataset"), dict):
            cfg["dataset"] = hashed_dataset(cfg["dataset"])
        return stable_hash(cfg)

    def run_name(self, data_version: str) -> str:
        """<name>-<hash of config hash and dataset version>: new data never resumes old
        weights, and a rerun of the same command finds its checkpoints."""
        return f"{self.name}-{stable_hash([self.config_hash(), data_version])}"

    def torch_threads(self) -> int:
        if self.train.torch_threads:
            return int(self.train.torch_threads)
        import math
        return max(1, math.ceil((self.scaling.resources_per_worker or {}).get("CPU", 1)))

    def _gpu_resource(self) -> list[str]:
        if self.scaling.use_gpu and self.scaling.per_worker("GPU") <= 0:
            return ["scaling.use_gpu=true but resources_per_worker.GPU is 0"]
        return []

    def _fits(self, info: ValidationInfo | None = None) -> list[str]:
        if info is not None and (info.context or {}).get("stored"):
            return []  # a stored run: it ran where it ran
        if self.ray.address is None and self.cluster.mode == "local":  # we know what it has
            return fits_local(self.scaling.per_worker("CPU"), self.scaling.per_worker("GPU"),
                              self.scaling.use_gpu, self.ray, self.scaling.bounds()[1])
        return []


class TrainJob(RunSections):
    """jobs.train on a table (conf/train.yaml)."""
    dataset: DatasetCfg
    model: ModelCfg
    optim: OptimCfg

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> TrainJob:
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
        p += self._gpu_resource()
        ck = self.checkpoint
        p += check_metric("checkpoint.checkpoint_score_attribute", ck.checkpoint_score_attribute)
        attr = ck.checkpoint_score_attribute or ""
        want = "min" if attr.endswith("loss") else "max"
        if attr in TRAIN_METRICS and attr != "epoch" and ck.checkpoint_score_order != want:
            p.append(f"checkpoint.checkpoint_score_order='{ck.checkpoint_score_order}'"
                     f" keeps the worst checkpoints by {attr} (use '{want}')")
        es = self.train.early_stopping
        if es and es.metric.endswith("loss") and es.mode != "min":
            p.append(f"train.early_stopping.mode='{es.mode}' for a loss (use 'min')")
        if es:
            p += check_metric("train.early_stopping.metric", es.metric)
        fp = self.train.fairness_penalty
        if self.is_trees():
            p += self._trees(fp)
        if fp.kind != "none" and fp.weight <= 0:
            p.append(f"train.fairness_penalty.kind='{fp.kind}' needs weight > 0 (got {fp.weight})")
        if fp.kind != "none":
            sens = fp.attribute or next(iter(self.dataset.sensitive), None)
            if sens is None or sens not in self.dataset.sensitive:
                p.append(f"train.fairness_penalty.attribute={sens!r} must be one of "
                         f"dataset.sensitive={self.dataset.sensitive}")
        problems(p, self._fits(info))
        return self

    def is_trees(self) -> bool:
        return self.model.target == TREES_TARGET

    def _trees(self, fp: FairnessPenaltyCfg) -> list[str]:
        """The booster's parameters checked, defaults filled in (they are part of the hash)."""
        from pydantic import ValidationError
        try:
            full = TreesCfg.model_validate(self.model.spec())
        except ValidationError as e:
            return [f"model.{'.'.join(map(str, err['loc']))}={err.get('input')!r}: {err['msg']}"
                    if err["loc"] else f"model: {err['msg'].removeprefix('Value error, ')}"
                    for err in e.errors()]
        other = ("num_leaves", "min_child_samples") if full.library == "xgboost" \
            else ("min_child_weight",)  # the other library's knobs: not this model's
        self.model = ModelCfg.model_validate(
            {k: v for k, v in full.plain().items() if k not in other})
        p = []
        import importlib.util
        if importlib.util.find_spec(full.library) is None:
            p.append(f"model.library={full.library}: the {full.library} package is not installed "
                     "(pip install 'mlops_ray[trees]' for XGBoost with GPU kernels, or "
                     "xgboost-cpu==3.0.5; LightGBM comes with mlops_ray)")
        if fp.kind != "none":
            p.append(f"train.fairness_penalty.kind='{fp.kind}' is not available for "
                     f"model.library={full.library} (the in-training penalty is the MLP's), but "
                     "the gates' fairness post-processing (evaluate's mitigation) still applies")
        if self.scaling.use_gpu and full.library == "lightgbm":
            p.append("scaling.use_gpu=true with model.library=lightgbm needs a CUDA build of "
                     "LightGBM; the pip wheel is CPU-only (use model=xgboost on GPUs)")
        return p

    def penalty_attribute(self) -> str | None:
        """The sensitive attribute of the in-training fairness penalty (None: no penalty)."""
        fp = self.train.fairness_penalty
        if fp.kind == "none" or not fp.weight:
            return None
        return fp.attribute or self.dataset.sensitive[0]


class FeaturesJob(TrainJob):
    """jobs.features: the experiment's feature store (dataset.feast)."""
    # apply: register the views (and copy their sources in); materialize: load the online store
    # up to `end`; list: what is registered; consume / stop: the stream consumer on Ray
    action: Literal["apply", "materialize", "list", "consume", "stop"] = "list"
    end: str | None = None  # materialize up to this ISO 8601 time (default: now)

    @field_validator("end")
    @classmethod
    def _end(cls, v: str | None) -> str | None:
        from datetime import datetime
        try:
            t = datetime.fromisoformat(v) if v is not None else None
        except ValueError:
            raise ValueError(f"end='{v}': not an ISO 8601 time (e.g. 2024-06-30T00:00:00Z)") \
                from None
        if t is not None and t.tzinfo is None:
            raise ValueError(f"end='{v}': give a time zone (e.g. a trailing Z for UTC)")
        return v

    @model_validator(mode="after")
    def _has_store(self) -> FeaturesJob:
        if self.dataset.feast is None:
            raise ValueError(f"dataset '{self.dataset.name}' has no feature store (dataset.feast);"
                             " use an experiment whose dataset has one, e.g. "
                             "+experiment=adult_people_mlp")
        return self
