"""The registry's key: it signs gate reports (so promotion acts only on a verdict an evaluation
with the key computed) and chains the audit log (so a database writer cannot rewrite history
and recompute the hashes). No Ray.

The key comes from MLOPS_RAY_REGISTRY_KEY (a secret only evaluators, approvers and the
registry hold: a Kubernetes Secret, a CI secret). Without it, a SQLite registry (the laptop)
keeps a key file next to its database, readable by its owner only (0600); a server database
(PostgreSQL) needs the variable.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from mlops_ray.errors import RegistryError

KEY_ENV = "MLOPS_RAY_REGISTRY_KEY"


def key_for(db_url: str) -> bytes:
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    if not db_url.startswith("sqlite:///"):
        raise RegistryError(f"{KEY_ENV} is not set: a registry on {db_url.split(':')[0]} signs "
                            "gate reports and its audit chain with a key only it holds; set it "
                            "(e.g. from a Kubernetes Secret) for every job that evaluates, "
                            "promotes or reads the registry")
    path = Path(db_url[len("sqlite:///"):]).with_suffix(".key")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # created once, atomically, owner-only; a racing creator's key wins for both
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    return path.read_text().strip().encode()


def _plain(o: Any) -> Any:
    try:
        return float(o)  # numpy numbers
    except (TypeError, ValueError):
        return str(o)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_plain).encode()


def mac(key: bytes, obj: Any) -> str:
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


# fields a report carries that are not part of the verdict: where it was read from, the
# down-sampled plot curves (left out of registry copies), the signature itself
UNSIGNED = ("signature", "report_uri", "curves")


def _body(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in UNSIGNED}


def sign(obj: dict[str, Any], key: bytes) -> dict[str, Any]:
    """`obj` (JSON-shaped) with a `signature` over its fields (but UNSIGNED)."""
    plain = json.loads(canonical(obj))  # numbers and keys as a reader of the JSON sees them
    return {**plain, "signature": {"alg": "HMAC-SHA256", "mac": mac(key, _body(plain))}}


def verified(obj: dict[str, Any] | None, key: bytes) -> bool:
    """Whether `obj` carries a signature made with `key` over exactly its fields."""
    if not isinstance(obj, dict) or not isinstance(obj.get("signature"), dict):
        return False
    return hmac.compare_digest(str(obj["signature"].get("mac", "")), mac(key, _body(obj)))


def verdict(files: dict[str, bytes], meta: dict[str, Any], key: bytes) -> tuple[bool, Any, str]:
    """(gates passed, champion run, why not trusted) of a version from its own gate report:
    only a report signed with the registry's key, about this very run, counts; what the
    registering caller claims (meta) does not."""
    try:
        report = json.loads(files.get("gate_report.json") or b"null")
    except ValueError:
        report = None
    if not verified(report, key):
        return False, None, "no gate report signed with the registry key"
    lin = report.get("lineage") or {}
    if (lin.get("run"), lin.get("data_version"), lin.get("config_hash")) != (
            meta.get("run_uri"), meta.get("data_version"), meta.get("config_hash")):
        return False, None, "the signed gate report is about another run, data or config"
    return bool(report.get("passed")), (report.get("champion") or {}).get("run"), ""
