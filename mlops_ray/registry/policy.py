"""Who is calling, and what their role allows.

Identity: when `MLOPS_RAY_API_TOKEN` is set, the policy file's `tokens` table maps the token's
SHA-256 to an identity (an unknown token is refused, never treated as anonymous); otherwise the
OS user running the process (`getpass.getuser()`).

Roles are ordered: viewer < trainer < approver < admin. A policy file (YAML) binds identities:

    roles:                     # the highest role an identity is listed under applies
      admin: [alice]
      approver: [bob]
      trainer: [ci-bot]
      viewer: ["*"]            # "*" = anybody else
    tokens:                    # sha256(token) -> identity; tokens themselves never stored
      3f2a...: ci-bot

With no policy file (the laptop default) the local OS user is admin and anybody else a viewer.
"""
from __future__ import annotations

import getpass
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_ray.errors import ConfigError, PermissionDenied

ROLES = ("viewer", "trainer", "approver", "admin")
TOKEN_ENV = "MLOPS_RAY_API_TOKEN"

# the least role each action needs
NEEDS = {
    "read": "viewer",
    "register": "trainer",
    "alias": "trainer",  # any alias but production
    "production": "approver",  # move production (promote, approve, rollback)
    "deploy": "approver",
    "retrain": "approver",
    "force": "admin",  # production onto a version whose gates failed
    "delete": "admin",
}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Policy:
    roles: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    source: str = "embedded default"

    @classmethod
    def default(cls) -> Policy:
        return cls({"admin": [getpass.getuser()], "viewer": ["*"]}, {},
                   "embedded default (local OS user is admin)")

    @classmethod
    def load(cls, path: str | None) -> Policy:
        if not path:
            return cls.default()
        import yaml
        p = Path(path).expanduser()
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"registry.policy={path!r}: cannot read ({e})") from None
        bad = [k for k in data if k not in ("roles", "tokens")]
        roles = data.get("roles") or {}
        bad += [f"roles.{r}" for r in roles if r not in ROLES]
        if bad:
            raise ConfigError(f"registry.policy={path!r}: unknown key(s) {bad} (allowed: roles "
                              f"with {', '.join(ROLES)}; tokens)")
        return cls({r: [str(i) for i in ids or []] for r, ids in roles.items()},
                   {str(k): str(v) for k, v in (data.get("tokens") or {}).items()}, str(p))

    def identity(self, env: Mapping[str, str] | None = None) -> str:
        env = os.environ if env is None else env
        token = env.get(TOKEN_ENV)
        if token:
            who = self.tokens.get(token_hash(token))
            if who is None:
                raise PermissionDenied(f"{TOKEN_ENV} is set but its token is not in the registry "
                                       f"policy ({self.source})")
            return who
        return getpass.getuser()

    def role_of(self, who: str) -> str | None:
        best = None
        for role in ROLES:
            ids = self.roles.get(role, [])
            if who in ids or "*" in ids:
                best = role
        return best

    def allows(self, who: str, action: str) -> bool:
        role = self.role_of(who)
        return role is not None and ROLES.index(role) >= ROLES.index(NEEDS[action])

    def describe(self, who: str) -> dict[str, Any]:
        return {"identity": who, "role": self.role_of(who), "policy": self.source}
