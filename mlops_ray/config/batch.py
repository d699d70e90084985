"""jobs.export and jobs.predict: one registry version (`ref=`) out of the serving path, as an
offline bundle or over a dataset on Ray Data (conf/export.yaml, conf/predict.yaml)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlops_ray.config.base import RayCfg, RegistrySections, Strict, registry_ref, storage_uri


class ExportJob(RegistrySections):
    ref: str  # registry ref: name@alias, name:VERSION, or name (= name@production)
    format: Literal["onnx", "torchscript"] = "onnx"
    out: str | None = None  # bundle folder (path or s3://); None: <storage.uri>/exports/<name>

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        return registry_ref(v)


class PredictDriftCfg(Strict):
    """Same meaning as serve.drift: a feature alerts when its effect size (PSI / JS) and its
    chi-squared p-value both cross these."""
    psi_threshold: float = Field(0.2, gt=0)
    js_threshold: float = Field(0.15, gt=0, le=1)
    p_value: float = Field(0.01, gt=0, lt=1)


class PredictLogCfg(Strict):
    """Every scored row also written to the online prediction log, in its schema (arm and
    endpoint "batch"), to compare offline with online answers and join late labels the same way
    (predict/predlog.py). Off by default: the output's predictions/ already holds every
    prediction; the log is for the comparison."""
    enabled: bool = False
    uri: str | None = None  # null: <storage.uri>/prediction_log (where serving logs by default)
    log_sensitive: bool = False  # true: the signature's role=sensitive inputs too (as serving)
    exclude: list[str] = []  # more input fields never logged

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else storage_uri(v)


class PredictCfg(Strict):
    batch_size: int = Field(4096, ge=1)  # rows per map_batches call
    concurrency: int | list[int] = 2  # scoring actors: N, or [min, max] (autoscaling pool)
    num_cpus: float = Field(0.5, gt=0)  # per actor (fractions pack actors onto cores)
    id_column: str | None = None  # None: source_file + source_row identify each row
    format: Literal["auto", "parquet", "csv"] = "auto"  # of the input
    rows_per_file: int = Field(1_000_000, ge=1)  # rows a write task gathers per output part
    object_store_mb: int | None = Field(None, ge=16)  # Ray Data's budget for blocks in flight
    drift: PredictDriftCfg = PredictDriftCfg()
    prediction_log: PredictLogCfg = PredictLogCfg()

    @field_validator("concurrency")
    @classmethod
    def _pool(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1 or isinstance(v, list) and (
                len(v) != 2 or v[0] < 1 or v[0] > v[1]):
            raise ValueError("scoring actors: a count >= 1, or [min, max] with 1 <= min <= max")
        return v

    def min_actors(self) -> int:
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[0]


class PredictJob(RegistrySections):
    ref: str  # registry ref: name@alias, name:VERSION, or name (= name@production)
    input: str  # .parquet/.pq/.csv(.gz) file or a folder of them; local path, file:// or s3://
    output: str  # folder (local path, file:// or s3://): predictions/, drift_report.json, _SUCCESS
    predict: PredictCfg = PredictCfg()
    ray: RayCfg = RayCfg()

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str) -> str:
        return registry_ref(v)

    @field_validator("input", "output")
    @classmethod
    def _uri(cls, v: str) -> str:
        return storage_uri(v)

    @model_validator(mode="after")
    def _fits_local(self) -> PredictJob:
        if self.ray.address is None:  # a local cluster: the pool must fit, reads need a core
            cpus = self.ray.local_cpus()
            need = self.predict.min_actors() * self.predict.num_cpus
            if need > cpus:
                raise ValueError(f"predict.concurrency={self.predict.concurrency} x "
                                 f"predict.num_cpus={self.predict.num_cpus} needs {need:g} CPUs; "
                                 f"the local cluster has {cpus} (lower either, or set "
                                 "ray.num_cpus)")
        return self
