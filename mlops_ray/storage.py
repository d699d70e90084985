"""One resolver for `file://` (or a plain path) and `s3://` URIs.

S3 goes through s3fs wrapped as a pyarrow filesystem: Ray Train accepts it as
`storage_filesystem`, and it works against real S3 as well as S3-compatible servers (MinIO,
moto — whose multipart answers pyarrow's native S3 client rejects). Credentials come from the
standard AWS environment variables / config files, never from our config (it is hashed and
written into run records).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from mlops_ray.errors import StorageError


@dataclass(frozen=True)
class Storage:
    uri: str  # normalised: file:///abs/path or s3://bucket/prefix
    fs: pafs.FileSystem
    root: str  # path inside `fs` (no scheme)

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("file://")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        return ("file://" if self.is_local else "s3://") + self.path(*parts).lstrip(
            "/" if not self.is_local else "")

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(*parts)) as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            raise StorageError(f"cannot read {self.uri_of(*parts)}: {e}") from None

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write atomically: readers see the old object or the whole new one, never a part."""
        dest = self.path(*parts)
        self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        if self.is_local:  # temp name + rename; an S3 PUT is already all-or-nothing
            tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, dest)
        else:
            with self.fs.open_output_stream(dest) as f:
                f.write(data)
        return self.uri_of(*parts)

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(),
                                *parts)

    def ls(self, *parts: str) -> list[str]:
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    def sub(self, *parts: str) -> Storage:
        """The same filesystem, rooted at a folder below this root."""
        return Storage(self.uri_of(*parts), self.fs, self.path(*parts))

    def ray_args(self, *parts: str) -> dict[str, Any]:
        """`storage_path`/`storage_filesystem` for ray.train/ray.tune RunConfig."""
        if self.is_local:
            return {"storage_path": self.path(*parts)}
        return {"storage_path": self.path(*parts), "storage_filesystem": self.fs}


def s3fs_filesystem(endpoint_url: str | None = None, region: str | None = None) -> Any:
    try:
        import s3fs
    except ImportError:
        raise StorageError("s3:// URIs need s3fs: pip install s3fs") from None
    client_kwargs = {k: v for k, v in (("endpoint_url", endpoint_url), ("region_name", region)) if v}
    # No keys here: the filesystem is pickled (Train's controller and workers, Tune's tuner.pkl
    # in the bucket), and keys would travel with it. Every process resolves them from the
    # standard chain: env (a local Ray inherits the driver's), ~/.aws, an instance/pod role.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True)


def resolve(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    """`outputs`, `/abs`, `file:///abs` or `s3://bucket/prefix` -> Storage."""
    if uri.startswith("s3://"):
        bucket_path = uri[len("s3://"):].strip("/")
        if not bucket_path:
            raise StorageError(f"storage.uri='{uri}': no bucket named")
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(s3fs_filesystem(endpoint_url, region)))
        return Storage(f"s3://{bucket_path}", fs, bucket_path)
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve()
    return Storage(f"file://{path}", pafs.LocalFileSystem(), str(path))


def from_cfg(storage_cfg: dict[str, Any]) -> Storage:
    return resolve(storage_cfg["uri"], storage_cfg.get("endpoint_url"), storage_cfg.get("region"))


def prediction_log(storage_cfg: dict[str, Any], uri: str | None) -> Storage:
    """Where the prediction and label logs live: `serve.prediction_log.uri`, else
    `<storage.uri>/prediction_log` (the same credentials and endpoint either way)."""
    if uri:
        return resolve(uri, storage_cfg.get("endpoint_url"), storage_cfg.get("region"))
    return from_cfg(storage_cfg).sub("prediction_log")
