"""What every job shares: the strict base model, one validator per grammar (names, registry
refs, URIs) and the sections that say where and how a job runs (storage, database, registry
policy, Ray, cluster submission, tracking, cost).

Sections that map onto a Ray class use Ray's own argument names. Unknown keys are errors
(`extra="forbid"`). No Hydra here (that is `config.compose`), no Ray.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

M = TypeVar("M", bound=BaseModel)

# -------------------------------------------------------------------------------- grammars
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(@[A-Za-z0-9][A-Za-z0-9_.-]{0,127}|:\d+)?$")


def registry_name(v: str, what: str = "name") -> str:
    """A registry model or alias name: letters, digits, '_', '-', '.'."""
    if not NAME_RE.match(v):
        raise ValueError(f"{what} {v!r}: use letters, digits, '_', '-', '.'")
    return v


def registry_ref(v: str) -> str:
    """A registry ref (name@alias, name:VERSION, or a bare name meaning name@production)."""
    if not REF_RE.match(v):
        raise ValueError("expected a registry ref: name@alias, name:VERSION or name "
                         "(letters, digits, '_', '-', '.')")
    return v if ("@" in v or ":" in v) else f"{v}@production"


def storage_uri(v: str) -> str:
    """A local path, file:// or s3:// URI."""
    scheme = v.split("://", 1)[0] if "://" in v else "file"
    if scheme not in ("file", "s3"):
        raise ValueError(f"scheme '{scheme}://' is not supported (allowed: file://, s3://, or a "
                         "plain local path)")
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    def plain(self) -> dict[str, Any]:
        """The plain dict that crosses a Ray boundary or is written to a record."""
        return self.model_dump(by_alias=True)


def view(job: Strict, schema: type[M], **changes: Any) -> M:
    """The part of `job` another job's schema knows, validated by that schema (so a run the
    pipeline trains has the name and hash `jobs.train` would give it)."""
    data = {k: v for k, v in job.plain().items() if k in schema.model_fields}
    data.update({k: (v.plain() if isinstance(v, Strict) else v) for k, v in changes.items()})
    return schema.model_validate(data)


def problems(*found: list[str]) -> None:
    """Raise every cross-field problem at once (explain() prints one line each)."""
    p = [x for group in found for x in group]
    if p:
        raise ValueError("; ".join(p))


# -------------------------------------------------------------------------------- sections
class StorageCfg(Strict):
    uri: str = "outputs"  # local path / file:// URI, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto); else AWS's
    region: str | None = None

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        try:
            return storage_uri(v)
        except ValueError as e:
            raise ValueError(f"'{v}': {e}") from None


class TrackingCfg(Strict):
    backend: Literal["wandb", "none"] = "wandb"
    mode: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE in the env wins
    project: str = "mlops_ray"
    entity: str | None = None


class RayCfg(Strict):
    # None: this checkout's warm local Ray (started by the first job, attached to by the next;
    # `make stop`); "local": a throwaway Ray inside this process; "auto" or host:port: connect
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # local cluster only
    num_gpus: int | None = Field(None, ge=0)
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"  # Ray Train's logs
    # exported before Ray starts; Ray Train propagates RAY_TRAIN_* to its controller and workers
    env_vars: dict[str, str] = {}
    # the warm Ray only (mlops_ray/pool.py): how many idle workers of no job to keep ready for
    # the next job, per kind, and the modules they import while idle (read when it starts)
    preload_modules: list[str] = []
    warm_pool: dict[Literal["train", "train_workers", "tasks"], int] = {}
    warm_pool_keep_alive_s: int = Field(900, ge=1)

    @field_validator("env_vars", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:  # `ray.env_vars.X=10` arrives as an int
        return {k: str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()} \
            if isinstance(v, dict) else v

    def local_cpus(self) -> int:
        return self.num_cpus or os.cpu_count() or 1

    def local_gpus(self) -> int:
        if self.num_gpus is not None:
            return self.num_gpus
        try:
            import torch
            return torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - no torch/CUDA means no GPUs
            return 0


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]+):[^@/\s]+@")


def redact_text(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def redact(obj: Any) -> Any:
    """A plain config as records keep it: env_vars values and URL passwords replaced by ***
    (records, registry versions and W&B are read by more people than the secrets are for)."""
    if isinstance(obj, dict):
        return {k: ({n: "***" for n in v} if k == "env_vars" and isinstance(v, dict)
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(x) for x in obj]
    return redact_text(obj) if isinstance(obj, str) else obj


# never uploaded with a remote job's working directory, whatever cluster.excludes says
SECRET_EXCLUDES = (".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", ".aws",
                   ".ssh", ".ray", ".netrc", ".pgpass", "*.db", "*.db-wal", "*.db-shm")


class ClusterCfg(Strict):
    mode: Literal["local", "remote"] = "local"
    address: str | None = None  # remote: the Jobs API, http://<head>:8265
    working_dir: str | None = None  # None: the project's root (where mlops_ray/ is)
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


class DbCfg(Strict):
    url: str | None = None  # SQLAlchemy URL; None: a SQLite file in the local output folder


class RegistryCfg(Strict):
    policy: str | None = None  # YAML policy file; None: the local OS user is admin


class RegistrySections(Strict):
    """Where the registry is: its artifact storage, its database, its access policy."""
    storage: StorageCfg = StorageCfg()
    db: DbCfg = DbCfg()
    registry: RegistryCfg = RegistryCfg()


def fits_local(per_worker_cpu: float, per_worker_gpu: float, use_gpu: bool, ray: RayCfg,
               workers: int) -> list[str]:
    """Problems when `workers` workers cannot fit the local cluster this job would start."""
    p = []
    cpus = ray.local_cpus()
    need_cpu = per_worker_cpu * workers
    if need_cpu > cpus + 1e-9:
        p.append(f"scaling: {workers} worker(s) x {per_worker_cpu} CPU = {need_cpu} CPUs, "
                 f"but the local Ray cluster has {cpus} (lower scaling.num_workers or "
                 "scaling.resources_per_worker.CPU, or connect to a cluster with ray.address)")
    if per_worker_gpu > 0:
        gpus = ray.local_gpus()
        if per_worker_gpu > gpus or (use_gpu and per_worker_gpu * workers > gpus):
            p.append(f"scaling: {workers} worker(s) x {per_worker_gpu} GPU needs "
                     f"{per_worker_gpu * workers} GPUs (at least {math.ceil(per_worker_gpu)} on "
                     f"one node), but this machine has {gpus} (set scaling.use_gpu=false, or "
                     "connect to a GPU cluster with ray.address)")
    return p
