"""Who may call the endpoint: API keys from the config, an environment variable (a Kubernetes
secret) or a key file; health routes stay open. (No Ray.)"""
from __future__ import annotations

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


def bearer_ok(header: str, keys: set[str]) -> bool:
    """An `Authorization: Bearer <key>` value naming one of `keys` (no keys: open)."""
    if not keys:
        return True
    return header.startswith("Bearer ") and header[7:] in keys
