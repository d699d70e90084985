"""Content-addressed, immutable version artifacts.

A version's files live under `<storage>/registry/<model>/<content hash>/` with a MANIFEST.json
listing each file's SHA-256 and size; the content hash is the SHA-256 of that manifest and is
recorded in the database. The artifact is uploaded *before* the version row is committed, so a
version that exists is always complete; a crash leaves at most an unreferenced folder. Every load
re-hashes every file: an edited, missing or extra file is refused with ArtifactCorrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from mlops_ray.errors import ArtifactCorrupted, StorageError
from mlops_ray.storage import Storage

MANIFEST = "MANIFEST.json"


def manifest_of(files: dict[str, bytes]) -> tuple[dict, str]:
    man = {"files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                     for n, b in sorted(files.items())}}
    return man, hashlib.sha256(_canon(man)).hexdigest()


def _canon(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write(storage: Storage, model: str, files: dict[str, bytes]) -> tuple[str, str]:
    """Upload (idempotent for the same content); returns (content hash, artifact URI)."""
    if MANIFEST in files or any("/" in n or n.startswith(".") for n in files):
        raise StorageError(f"artifact file names must be plain and not {MANIFEST}: {sorted(files)}")
    man, digest = manifest_of(files)
    parts = ("registry", model, digest[:32])
    if storage.is_local:  # a whole folder appears at once: temp folder + rename
        final = Path(storage.path(*parts))
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            (tmp / MANIFEST).write_bytes(_canon(man))
            try:
                os.rename(tmp, final)
            except OSError:  # another process registered the same content first
                shutil.rmtree(tmp, ignore_errors=True)
        verify_dir(final, digest)
    else:  # object stores: files first, manifest last; unreferenced until the row commits
        for name, data in files.items():
            storage.write_bytes(data, *parts, name)
        storage.write_bytes(_canon(man), *parts, MANIFEST)
    return digest, storage.uri_of(*parts)


def verify_dir(folder: Path, content_hash: str) -> dict:
    """Re-hash every file against the manifest and the manifest against `content_hash`."""
    where = str(folder)
    try:
        raw = (folder / MANIFEST).read_bytes()
    except OSError:
        raise ArtifactCorrupted(f"artifact {where}: {MANIFEST} is missing") from None
    man = json.loads(raw)
    if hashlib.sha256(_canon(man)).hexdigest() != content_hash:
        raise ArtifactCorrupted(f"artifact {where}: {MANIFEST} does not match the registered "
                                f"content hash {content_hash[:16]}… (edited manifest)")
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    expected = set(man["files"])
    if present != expected:
        raise ArtifactCorrupted(f"artifact {where}: files differ from the manifest (missing: "
                                f"{sorted(expected - present)}, unexpected: "
                                f"{sorted(present - expected)})")
    for name, entry in man["files"].items():
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise ArtifactCorrupted(f"artifact {where}: file '{name}' was altered (sha256 "
                                    f"{digest[:16]}…, registered {entry['sha256'][:16]}…)")
    return man


def fetch(uri: str, content_hash: str, storage: Storage) -> Path:
    """A verified local folder with the artifact (downloaded first when remote; `storage` is
    the registry's, whose filesystem carries the endpoint and credentials)."""
    if uri.startswith("file://"):
        folder = Path(uri[len("file://"):])
        if not folder.is_dir():
            raise ArtifactCorrupted(f"artifact {uri} is missing")
        verify_dir(folder, content_hash)
        return folder
    import pyarrow.fs as pafs
    folder = Path(tempfile.mkdtemp(prefix=f"mlops-ray-{content_hash[:12]}-"))
    try:
        pafs.copy_files(uri[len("s3://"):], str(folder), source_filesystem=storage.fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except (OSError, FileNotFoundError) as e:
        raise ArtifactCorrupted(f"artifact {uri} cannot be downloaded: {e}") from None
    verify_dir(folder, content_hash)
    return folder
