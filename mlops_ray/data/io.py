"""Read a table from `builtin://NAME`, a local path or an `s3://` URI, and hash its content."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd

from mlops_ray.errors import DataValidationError, StorageError

BUILTIN = Path(__file__).resolve().parent / "builtin"


def _format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    low = uri.lower()
    if low.endswith((".parquet", ".pq")) or low.startswith("builtin://"):
        return "parquet"
    if low.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DataValidationError(uri, [f"dataset.format='auto' cannot tell the format of '{uri}' "
                                    "(allowed: a .parquet/.pq/.csv name, or set dataset.format)"])


def builtin_path(uri: str) -> Path:
    """builtin://NAME -> the shipped Parquet file (which may not exist)."""
    return BUILTIN / f"{uri[len('builtin://'):]}.parquet"


def load_table(uri: str, fmt: str = "auto", endpoint_url: str | None = None,
               region: str | None = None) -> pd.DataFrame:
    kind = _format(uri, fmt)
    if uri.startswith("builtin://"):
        path = builtin_path(uri)
        if not path.exists():
            names = sorted(p.stem for p in BUILTIN.glob("*.parquet"))
            raise StorageError(f"dataset.uri='{uri}': no such builtin dataset (allowed: "
                               f"{', '.join('builtin://' + n for n in names)})")
        return pd.read_parquet(path)
    if uri.startswith("s3://"):
        from mlops_ray.storage import s3fs_filesystem
        try:
            with s3fs_filesystem(endpoint_url, region).open(uri, "rb") as f:
                data = io.BytesIO(f.read())
        except (FileNotFoundError, OSError, PermissionError) as e:
            raise StorageError(f"dataset.uri='{uri}': cannot read ({e})") from None
        return pd.read_parquet(data) if kind == "parquet" else pd.read_csv(data)
    local = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    if not local.exists():
        raise StorageError(f"dataset.uri='{uri}': file not found ({local.resolve()})")
    return pd.read_parquet(local) if kind == "parquet" else pd.read_csv(local)


def _dtype_name(col: pd.Series) -> str:
    """The dtype as pandas 3 names it: a column of strings is "str" whether pandas holds it as
    object (pandas 2, which Feast needs) or as its string dtype, so a table's version (and the
    run names built on it) does not depend on the pandas version."""
    if col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty"):
        return "str"
    return str(col.dtype)


def dataset_version(df: pd.DataFrame) -> str:
    """Content hash of the table (column names, dtypes and values; not file bytes or row index)."""
    h = hashlib.sha256()
    h.update(repr([(c, _dtype_name(df[c])) for c in df.columns]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]
