"""`dataset.feast`: a dataset whose features come from a Feast feature store (docs/features.md).

The dataset's `uri` is then the *entity frame*: the join key, the event time and the label of
each training row. The feature views below are joined to it point in time; serving looks the
same views up online by the join key; `jobs.features consume` feeds the views marked `stream`
from a Redis stream. Definitions are data (this section), so they are validated, hashed into the
dataset version and copied into the run record; no Python repo file is executed.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlops_ray.config.base import Strict, problems, registry_name, storage_uri


class FeatureViewCfg(Strict):
    name: str
    # a Parquet table: the join key, `timestamp_field`, `created_timestamp_field` and the
    # features (builtin://NAME, a local path); copied into the store's folder by `apply`
    source: str
    features: list[str]
    ttl_s: int = Field(0, ge=0)  # how old a value may be at a row's event time; 0: no limit
    stream: bool = False  # a push source: `jobs.features consume` writes events to this view

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return registry_name(v, "feature view name")

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a feature view needs at least one feature")
        return v


def _no_password(v: str) -> str:
    if "password=" in v.replace(" ", "").lower():
        raise ValueError("a password in connection_string would be written to run records and "
                         "the registry: name an environment variable in password_env instead")
    return v


def with_password(connection_string: str, password_env: str | None) -> str:
    """The connection string with the password from `password_env` (read where it is used)."""
    if not password_env:
        return connection_string
    import os
    if password_env not in os.environ:
        raise ValueError(f"password_env='{password_env}': the variable is not set here")
    return f"{connection_string},password={os.environ[password_env]}"


class RedisConnection(Strict):
    """A Redis server, in Feast's connection-string grammar; its password by variable only."""
    connection_string: str = "127.0.0.1:6379"  # host:port[,db=N,ssl=true]
    password_env: str | None = None  # the environment variable holding its password

    @field_validator("connection_string")
    @classmethod
    def _conn(cls, v: str) -> str:
        return _no_password(v)

    def redis_connection(self) -> str:
        return with_password(self.connection_string, self.password_env)


class OnlineStoreCfg(RedisConnection):
    type: Literal["sqlite", "redis"] = "sqlite"  # sqlite: a file in the store's folder; the
    # connection fields apply to redis


class StreamCfg(RedisConnection):
    """The Redis stream `jobs.features consume` reads (one consumer group, acknowledged)."""
    key: str | None = None  # the stream's key; default "features:<project>"
    group: str = "mlops-features"
    consumer: str = "consumer-0"  # stable: after a restart it owns its unacknowledged events
    batch: int = Field(500, ge=1, le=100_000)  # events per read (and per offline part)
    block_ms: int = Field(100, ge=1, le=60_000)
    # the freshness bound: the consumer's status says whether it is within it; the alert
    # MlopsFeatureFreshnessLag (observability/alerts.yml) uses the same 1 s: change both
    max_lag_s: float = Field(1.0, gt=0)
    trim: bool = True  # drop acknowledged events from the stream (false: other groups read it)
    # merge a view's stream parts into one once it has this many (0: never); fewer files keep
    # the point-in-time join fast on a busy stream
    compact_every: int = Field(100, ge=0)


class FeastCfg(Strict):
    project: str
    entity: str = "entity"  # Feast entity name
    join_key: str  # the entity frame's (and every source's) key column
    timestamp_field: str = "event_timestamp"  # event time, in the entity frame and the sources
    created_timestamp_field: str = "created"  # when a value became known (sources only)
    # leakage-proof by default: a value is joined only if it was known by the row's event time
    filter_by_created_timestamp: bool = True
    views: list[FeatureViewCfg]
    online: OnlineStoreCfg = OnlineStoreCfg()
    stream: StreamCfg = StreamCfg()
    # the store's folder (registry, online SQLite file, sources); default <storage.uri>/features/<project>
    path: str | None = None
    on_missing: Literal["error", "null"] = "error"  # serving, entity unknown online: 404 or nulls

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        if not v.replace("_", "").isalnum():
            raise ValueError(f"'{v}': Feast project names use letters, digits and '_'")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and storage_uri(v).startswith("s3://"):
            raise ValueError(f"'{v}': the feature store's folder must be local for now (the "
                             "SQLite online store and Feast's file registry)")
        return v

    @model_validator(mode="after")
    def _views(self) -> FeastCfg:
        p = []
        names = [v.name for v in self.views]
        if not names:
            p.append("dataset.feast.views: at least one feature view")
        if len(set(names)) != len(names):
            p.append(f"dataset.feast.views: names listed twice: {names}")
        feats = [f for v in self.views for f in v.features]
        dup = sorted({f for f in feats if feats.count(f) > 1})
        if dup:
            p.append(f"dataset.feast.views: features in two views: {dup} (a training column "
                     "needs one source)")
        reserved = {self.join_key, self.timestamp_field, self.created_timestamp_field}
        clash = sorted(reserved & set(feats))
        if clash:
            p.append(f"dataset.feast.views: {clash} is the join key or a timestamp, not a feature")
        problems(p)
        return self

    def feature_refs(self) -> list[str]:
        """"view:feature" for every feature, in the views' order."""
        return [f"{v.name}:{f}" for v in self.views for f in v.features]

    def columns(self) -> dict[str, str]:
        """feature -> its view."""
        return {f: v.name for v in self.views for f in v.features}

    def stream_key(self) -> str:
        return self.stream.key or f"features:{self.project}"


def check_dataset(feast: FeastCfg | None, label: str, features: list[str],
                  sensitive: list[str]) -> list[str]:
    """Cross-checks of a dataset section against its feature views."""
    if feast is None:
        return []
    have = feast.columns()
    p = [f"dataset.numeric/categorical: '{c}' is in no feature view of dataset.feast.views "
         f"(they hold {sorted(have)})" for c in features if c not in have]
    p += [f"dataset.sensitive: '{c}' is in no feature view (the fairness gates need it in the "
          "training table)" for c in sensitive if c not in have]
    if label in have:
        p.append(f"dataset.label='{label}' comes from a feature view; the label belongs to the "
                 "entity frame (dataset.uri)")
    return p

