"""A Feast feature store built from `dataset.feast` (config/features.py): definitions, apply,
materialize, the point-in-time training table and online lookups. No Ray, no Hydra.

The store's folder (`<storage.uri>/features/<project>` unless `dataset.feast.path`) holds:

    registry.db           Feast's file registry (what `apply` registered)
    online.db             the SQLite online store (online.type=sqlite)
    sources/<view>/*.parquet   each view's offline rows: `base.parquet` copied from the
                          configured source by `apply`, `stream-<first>-<last>.parquet` parts
                          written by the stream consumer (each whole: temporary name, rename)

Offline: Feast's DuckDB offline store (an ibis point-in-time join inside DuckDB) with
`filter_by_created_timestamp`, so a value known only after a row's event time never reaches that
row. Feast's default (`file`, Dask) is the baseline `bench/features.py` measures against.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mlops_ray.data.io import builtin_path
from mlops_ray.errors import ConfigError, DataValidationError, StorageError
from mlops_ray.storage import resolve

if TYPE_CHECKING:
    from feast import FeatureStore

    from mlops_ray.config.features import FeastCfg

log = logging.getLogger(__name__)
_FEAST_HINT = "pip install 'mlops_ray[features]' (Feast with its DuckDB and Redis stores)"


def store_dir(cfg: FeastCfg, storage_uri: str = "outputs") -> Path:
    if cfg.path:
        return Path(cfg.path.removeprefix("file://")).expanduser().resolve()
    if storage_uri.startswith("s3://"):
        raise ConfigError("dataset.feast.path: required when storage.uri is s3:// (the store's "
                          "registry and SQLite online store are local files; online.type=redis "
                          "serves a cluster)")
    return (Path(storage_uri.removeprefix("file://")).expanduser() / "features"
            / cfg.project).resolve()


def _source_path(uri: str) -> Path:
    if uri.startswith("builtin://"):
        return builtin_path(uri)
    if uri.startswith("s3://"):
        raise ConfigError(f"dataset.feast.views[].source='{uri}': local Parquet only for now")
    return Path(uri.removeprefix("file://")).expanduser()


def _feast_type(t: Any, where: str) -> Any:
    import pyarrow as pa
    from feast.types import Bool, Float32, Float64, Int32, Int64, String
    if pa.types.is_dictionary(t):  # what a pandas categorical becomes in Parquet
        t = t.value_type
    if pa.types.is_boolean(t):
        return Bool
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return Int64
    if pa.types.is_integer(t) and not pa.types.is_uint64(t):
        return Int32
    if pa.types.is_float32(t):
        return Float32
    if pa.types.is_floating(t):
        return Float64
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return String
    raise ConfigError(f"{where}: type {t} (allowed: booleans, integers up to int64, floats, "
                      "strings)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stream_id(s: str) -> tuple[int, int]:
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


def _id_range(name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first, last) stream ids of `stream-<ms>-<seq>-<ms>-<seq>.parquet` (or compacted-)."""
    ms1, seq1, ms2, seq2 = name.removesuffix(".parquet").split("-")[1:]
    return (int(ms1), int(seq1)), (int(ms2), int(seq2))


class FeatureRepo:
    """One project's store. Cheap to build; Feast is imported on first use."""

    def __init__(self, cfg: FeastCfg, storage_uri: str = "outputs"):
        self.cfg = cfg
        self.root = store_dir(cfg, storage_uri)
        self._store: FeatureStore | None = None
        self._objects: dict[str, Any] | None = None
        self._schemas: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ definitions
    def view_dir(self, view: str) -> Path:
        return self.root / "sources" / view

    def _schema(self, view: Any) -> dict[str, Any]:
        """The view's columns and their Arrow types, from its base source (or applied copy);
        read once per repo."""
        if view.name not in self._schemas:
            self._schemas[view.name] = self._read_schema(view)
        return self._schemas[view.name]

    def _read_schema(self, view: Any) -> dict[str, Any]:
        applied = self.view_dir(view.name) / "base.parquet"
        path = applied if applied.exists() else _source_path(view.source)
        if not path.exists():
            raise StorageError(f"dataset.feast.views[{view.name}].source='{view.source}': file "
                               f"not found ({path})")
        schema = pq.read_schema(path)
        c = self.cfg
        need = [c.join_key, c.timestamp_field, c.created_timestamp_field, *view.features]
        missing = [n for n in need if n not in schema.names]
        if missing:
            raise DataValidationError(view.source, [
                f"feature view '{view.name}': column(s) {missing} missing (the source has "
                f"{schema.names})"])
        import pyarrow as pa
        for n in (c.timestamp_field, c.created_timestamp_field):
            t = schema.field(n).type
            if not pa.types.is_timestamp(t) or t.tz is None:
                raise DataValidationError(view.source, [
                    f"feature view '{view.name}': column '{n}' is {t}; it must be a timestamp "
                    "with a time zone (e.g. timestamp[us, tz=UTC]): a naive time means "
                    "different instants to DuckDB and to pandas"])
        return {n: schema.field(n).type for n in need}

    def definitions(self) -> dict[str, Any]:
        """The Feast objects: the entity, one FileSource (+ PushSource if streamed) and
        FeatureView per view. A view reads every Parquet part of its folder."""
        if self._objects is not None:
            return self._objects
        try:
            from feast import Entity, FeatureView, Field, FileSource, PushSource
            from feast.data_format import ParquetFormat
        except ImportError as e:
            raise ConfigError(f"dataset.feast needs Feast ({e}): {_FEAST_HINT}") from None
        c = self.cfg
        objs: dict[str, Any] = {}
        schemas = {v.name: self._schema(v) for v in c.views}
        key_type = _feast_type(schemas[c.views[0].name][c.join_key], "dataset.feast.join_key")
        from feast import ValueType
        entity = Entity(name=c.entity, join_keys=[c.join_key],
                        value_type=ValueType.INT64 if key_type.name.startswith("INT")
                        else ValueType.STRING)
        objs[c.entity] = entity
        for v in c.views:
            src: Any = FileSource(name=f"{v.name}_source",
                                  path=str(self.view_dir(v.name) / "*.parquet"),
                                  file_format=ParquetFormat(), timestamp_field=c.timestamp_field,
                                  created_timestamp_column=c.created_timestamp_field)
            if v.stream:
                src = PushSource(name=f"{v.name}_push", batch_source=src)
            objs[v.name] = FeatureView(
                name=v.name, entities=[entity], ttl=timedelta(seconds=v.ttl_s), online=True,
                schema=[Field(name=f, dtype=_feast_type(
                    schemas[v.name][f], f"dataset.feast.views[{v.name}].features: '{f}'"))
                        for f in v.features], source=src)
        self._objects = objs
        return objs

    def definitions_hash(self) -> str:
        """What the views are (names, features, types, ttl, keys), not where their files are."""
        c = self.cfg
        spec = {"entity": c.entity, "join_key": c.join_key, "ts": c.timestamp_field,
                "created": c.created_timestamp_field,
                "filter_by_created": c.filter_by_created_timestamp,
                "views": [{"name": v.name, "ttl_s": v.ttl_s,
                           "features": {f: str(t) for f, t in self._schema(v).items()}}
                          for v in c.views]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            from feast import FeatureStore
            from feast.repo_config import RepoConfig
            c = self.cfg
            online: dict[str, Any] = ({"type": "sqlite", "path": str(self.root / "online.db")}
                                      if c.online.type == "sqlite" else
                                      {"type": "redis",
                                       "connection_string": c.online.redis_connection()})
            self.root.mkdir(parents=True, exist_ok=True)
            config = RepoConfig(project=c.project, provider="local",
                                registry=str(self.root / "registry.db"),
                                offline_store={"type": "duckdb"}, online_store=online,
                                entity_key_serialization_version=3, repo_path=str(self.root))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._store = FeatureStore(config=config)
        return self._store

    # ------------------------------------------------------------------ operations
    def apply(self) -> list[str]:
        """Copy each view's base source into the store's folder (once: streamed parts are never
        overwritten) and register the definitions. Idempotent."""
        for v in self.cfg.views:
            d = self.view_dir(v.name)
            base = d / "base.parquet"
            if not base.exists():
                src = _source_path(v.source)
                if not src.exists():
                    raise StorageError(f"dataset.feast.views[{v.name}].source='{v.source}': "
                                       f"file not found ({src})")
                data = src.read_bytes()  # whole or absent: a reader never sees half a file
                self.write(v.name, "source.json", json.dumps(
                    {"source": v.source, "sha256": hashlib.sha256(data).hexdigest()}).encode())
                self.write(v.name, "base.parquet", data)
        objs = self.definitions()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.store.apply(list(objs.values()))
        return [v.name for v in self.cfg.views]

    def applied(self) -> bool:
        return (self.root / "registry.db").exists() and all(
            (self.view_dir(v.name) / "base.parquet").exists() for v in self.cfg.views)

    def ensure_applied(self) -> None:
        if not self.applied():
            self.apply()
        self.check_sources()

    def check_sources(self) -> None:
        """The store was filled from each view's configured source: a source changed since
        (another file, or new content) is named, not silently ignored."""
        p = []
        for v in self.cfg.views:
            f = self.view_dir(v.name) / "source.json"
            if not f.exists():
                continue
            was = json.loads(f.read_text())
            src = _source_path(v.source)
            now = _sha256(src) if src.exists() else "missing"
            if was["source"] != v.source or was["sha256"] != now:
                p.append(f"dataset.feast.views[{v.name}].source='{v.source}' "
                         f"({now[:12]}): the store at {self.root} was filled from "
                         f"'{was['source']}' ({was['sha256'][:12]}); give the new data its own "
                         "store (dataset.feast.path, or a new project) or restore the source")
        if p:
            raise ConfigError("; ".join(p))

    def materialize(self, end: datetime | None = None) -> dict[str, Any]:
        """Load the online store up to `end` (default now). The first time from the start of
        the data; then incrementally, from where the previous run ended."""
        self.ensure_applied()
        end = end or datetime.now(timezone.utc)
        views = [v.name for v in self.cfg.views]
        fresh = [v for v in views if not self.store.get_feature_view(v).materialization_intervals]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fresh:
                self.store.materialize(start_date=datetime(1970, 1, 2, tzinfo=timezone.utc),
                                       end_date=end, feature_views=fresh)
            rest = [v for v in views if v not in fresh]
            if rest:
                self.store.materialize_incremental(end_date=end, feature_views=rest)
        return {"end": end.isoformat(), "full": fresh, "incremental": rest}

    def materialized_to(self) -> datetime | None:
        """The time the online store holds every view up to (the earliest of their last
        materializations); None before the first."""
        ends = [fv.materialization_intervals[-1][1] if fv.materialization_intervals else None
                for fv in self.store.list_feature_views()]
        return None if not ends or None in ends else min(e for e in ends if e is not None)

    def describe(self) -> list[dict[str, Any]]:
        """What `jobs.features action=list` prints: each registered view, its features and
        materialized intervals, its offline parts."""
        out = []
        for fv in self.store.list_feature_views():
            parts = sorted(p.name for p in self.view_dir(fv.name).glob("*.parquet"))
            out.append({"view": fv.name, "entities": list(fv.entities),
                        "features": [f.name for f in fv.features],
                        "ttl_s": int(fv.ttl.total_seconds()) if fv.ttl else 0,
                        "stream": fv.stream_source is not None,
                        "materialized_to": (fv.materialization_intervals[-1][1].isoformat()
                                            if fv.materialization_intervals else None),
                        "offline_parts": len(parts)})
        return out

    def compact(self, view: str, upto: str | None = None) -> dict[str, Any]:
        """Merge the view's stream parts (those whose last stream id is <= `upto`, or all) into
        one `compacted-<first>-<last>.parquet`: written whole, then the parts are deleted. If
        the deletes are cut short, the rows exist twice, identical (same key, times and values),
        which a point-in-time join reads as once; the next call deletes the leftovers first.
        The stream consumer calls it with its last acknowledged id, so a batch that may be
        re-applied is never merged."""
        import pyarrow as pa
        d = self.view_dir(view)
        held = [_id_range(p.name) for p in d.glob("compacted-*.parquet")]
        parts = []
        for p in sorted(d.glob("stream-*.parquet")):
            first, last = _id_range(p.name)
            if any(a <= first and last <= b for a, b in held):
                p.unlink()  # already in a compacted file (an interrupted compaction)
            elif upto is None or last <= _stream_id(upto):
                parts.append((first, last, p))
        if len(parts) < 2:
            return {"view": view, "merged": 0}
        table = pa.concat_tables([pq.read_table(p) for _, _, p in parts])
        first, last = min(a for a, _, _ in parts), max(b for _, b, _ in parts)
        name = f"compacted-{first[0]}-{first[1]}-{last[0]}-{last[1]}.parquet"
        self.write_table(view, name, table)
        for _, _, p in parts:
            p.unlink()
        return {"view": view, "merged": len(parts), "rows": table.num_rows, "into": name}

    def write(self, view: str, name: str, data: bytes) -> None:
        """A file of the view's folder, whole: Storage's temporary name (never *.parquet, so
        a reader's glob skips it) and rename."""
        resolve(str(self.view_dir(view))).write_bytes(data, name)

    def write_table(self, view: str, name: str, table: Any) -> None:
        import pyarrow as pa
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self.write(view, name, buf.getvalue().to_pybytes())

    # ------------------------------------------------------------------ reads
    def training_frame(self, entity_df: pd.DataFrame) -> pd.DataFrame:
        """The point-in-time join: each entity row gets, per view, the latest value whose event
        time is <= the row's (within the view's ttl) and, by default, that was known (created)
        by then. Rows come back in the entity frame's order."""
        c = self.cfg
        missing = [n for n in (c.join_key, c.timestamp_field) if n not in entity_df.columns]
        if missing:
            raise DataValidationError("dataset.uri", [
                f"the entity frame lacks {missing} (dataset.feast.join_key / timestamp_field; it "
                f"has {list(entity_df.columns)[:20]})"])
        clash = sorted(set(entity_df.columns) & set(c.columns()))
        if clash:
            raise DataValidationError("dataset.uri", [
                f"the entity frame already has the feature column(s) {clash}"])
        self.ensure_applied()
        ent = entity_df.reset_index(drop=True).copy()
        ts = ent[c.timestamp_field]
        if not isinstance(ts.dtype, pd.DatetimeTZDtype):
            ent[c.timestamp_field] = pd.to_datetime(ts, utc=True)
        ent["_row"] = range(len(ent))  # Feast returns rows in its own order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = self.store.get_historical_features(
                ent, c.feature_refs(),
                filter_by_created_timestamp=c.filter_by_created_timestamp).to_arrow()
        rows = table.column("_row").to_numpy()
        # one row out per row in (Feast's Dask store drops rows without a value; DuckDB does not)
        if table.num_rows != len(ent) or (np.bincount(rows, minlength=len(ent)) != 1).any():
            raise DataValidationError("dataset.feast", [
                f"the join returned {table.num_rows} rows for {len(ent)} entity rows, not one "
                "for each"])
        # back to the entity frame's order, in Arrow (a pandas take of string columns costs
        # more than the join): `_row` is a permutation, so a position lookup (O(n))
        at = np.empty(table.num_rows, dtype=np.int64)
        at[rows] = np.arange(table.num_rows)
        return table.take(at).select([*map(str, entity_df.columns), *c.columns()]).to_pandas()

    def online(self, keys: list[Any], features: list[str] | None = None
               ) -> dict[str, list[Any]]:
        """The latest values of `features` (default: every one) for each key, as columns; a
        key the online store does not know has None everywhere."""
        refs = [f"{self.cfg.columns()[f]}:{f}" for f in features] if features \
            else self.cfg.feature_refs()
        rows = [{self.cfg.join_key: k} for k in keys]
        return self.store.get_online_features(refs, rows).to_dict()
