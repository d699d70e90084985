"""Who may call the endpoint: API keys from the config, an environment variable (a Kubernetes
secret) or a key file; health routes stay open. (No Ray.)"""
from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

HEALTH = {"/health", "/v2/health/live", "/v2/health/ready"}


def api_keys(auth: Any) -> list[str]:
    """The keys of `serve.auth` (an AuthCfg): listed ones, the variable's, the file's."""
    keys = list(auth.api_keys or [])
    if auth.api_keys_env and os.environ.get(auth.api_keys_env):
        keys += [k.strip() for k in os.environ[auth.api_keys_env].split(",") if k.strip()]
    if auth.key_file:
        keys += [k.strip() for k in Path(auth.key_file).expanduser().read_text().splitlines()
                 if k.strip() and not k.startswith("#")]
    return keys


def env_keys(variable: str | None) -> set[str]:
    """Keys a replica reads at start (a Serve config file carries the variable's name only)."""
    if not variable:
        return set()
    return {k.strip() for k in os.environ.get(variable, "").split(",") if k.strip()}


def key_ok(header: str, keys: set[str]) -> bool:
    """An `Authorization: Bearer <key>` value naming one of `keys`, compared in constant time
    (every key is compared, whatever matched)."""
    given = header[7:].encode() if header.startswith("Bearer ") else b""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k.encode())
    return ok and bool(given)


def any_keys(auth: Any) -> bool:
    """Whether `serve.auth` (an AuthCfg) gives any key, in any scope, here."""
    return bool(api_keys(auth) or env_keys(auth.admin_keys_env)
                or env_keys(auth.feedback_keys_env))


LOOPBACK = ("127.", "::1", "localhost")


def check_bind(host: str, auth: Any) -> None:
    """ConfigError for a bind off loopback that would answer anybody (no key configured),
    unless serve.auth.allow_anonymous=true says so explicitly."""
    if host.startswith(LOOPBACK) or any_keys(auth) or auth.allow_anonymous:
        return
    from mlops_ray.errors import ConfigError
    raise ConfigError(
        f"serve.host={host!r} answers other machines but no API key is configured: set "
        f"{auth.api_keys_env or 'serve.auth.api_keys_env'} (or serve.auth.key_file), or "
        "serve.auth.allow_anonymous=true to serve without keys on purpose")
