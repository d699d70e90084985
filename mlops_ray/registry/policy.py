"""Who is calling, and what their role allows.

Roles are ordered: viewer < trainer < approver < admin. A policy (YAML) binds identities:

    roles:                     # the highest role an identity is listed under applies
      admin: [alice]
      approver: [bob]
      trainer: [ci-bot]
      viewer: ["*"]            # "*" = anybody else, callers without a token included
    tokens:                    # sha256(token) -> identity; tokens themselves never stored
      3f2a...: ci-bot

The policy lives in the registry's database (store.py): the first job that names a file
(`registry.policy=policy.yaml`) installs it, an admin replaces it (`jobs.registry policy set`),
and a job that names no file, or another one, cannot switch it off or swap it.

Identity: under a policy, only a token counts (`MLOPS_RAY_API_TOKEN`, looked up by its SHA-256;
an unknown token is refused); without one the caller is `anonymous` (what "*" grants). Only a
registry without any policy (the laptop default) takes the OS account running the process as
its admin: the account of the process (not $USER or $LOGNAME, which anybody can set).
"""
from __future__ import annotations

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
    "policy": "admin",  # replace the stored policy
}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def os_user() -> str:
    """The account this process runs as (from the process's uid, not the environment)."""
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Policy:
    roles: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    source: str = "embedded default"
    is_default: bool = False

    @classmethod
    def default(cls) -> Policy:
        return cls({"admin": [os_user()], "viewer": ["*"]}, {},
                   "embedded default (the local OS account is admin)", is_default=True)

    @classmethod
    def load(cls, path: str | None) -> Policy:
        if not path:
            return cls.default()
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"registry.policy={path!r}: cannot read ({e})") from None
        return cls.parse(text, str(p))

    @classmethod
    def parse(cls, text: str, source: str) -> Policy:
        import yaml
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"registry policy {source}: not a mapping of roles and tokens")
        bad = [k for k in data if k not in ("roles", "tokens")]
        roles = data.get("roles") or {}
        bad += [f"roles.{r}" for r in roles if r not in ROLES]
        if bad:
            raise ConfigError(f"registry policy {source}: unknown key(s) {bad} (allowed: roles "
                              f"with {', '.join(ROLES)}; tokens)")
        return cls({r: [str(i) for i in ids or []] for r, ids in roles.items()},
                   {str(k): str(v) for k, v in (data.get("tokens") or {}).items()}, source)

    def text(self) -> str:
        """The policy as the registry stores it (canonical YAML)."""
        import yaml
        return yaml.safe_dump({"roles": self.roles, "tokens": self.tokens}, sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()

    def identity(self, env: Mapping[str, str] | None = None) -> str:
        env = os.environ if env is None else env
        token = env.get(TOKEN_ENV)
        if token:
            who = self.tokens.get(token_hash(token))
            if who is None:
                raise PermissionDenied(f"{TOKEN_ENV} is set but its token is not in the registry "
                                       f"policy ({self.source})")
            return who
        return os_user() if self.is_default else ANONYMOUS

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


def stored_policy(conn: Any, given: Policy, actor: str | None, key: bytes) -> Policy:
    """The policy in force: the one stored in the registry's database (inside the caller's
    locked transaction). A job naming a policy file installs it into a registry that has none;
    naming none, or another one, changes nothing."""
    import sqlalchemy as sa

    from mlops_ray.registry import audit
    from mlops_ray.registry import schema as S
    row = conn.execute(sa.select(S.policy)).first()
    if row is None:
        if given.is_default:
            return given
        who = actor or given.identity()
        conn.execute(S.policy.insert().values(id=1, text=given.text(), sha256=given.digest(),
                                              set_by=who, set_at=audit.now()))
        audit.append(conn, key, who, "policy_set",
                     details={"sha256": given.digest(), "source": given.source})
        return given
    stored = Policy.parse(row.text, f"stored in the registry (sha256 {row.sha256[:12]}, set by "
                                    f"{row.set_by})")
    if not given.is_default and given.digest() != row.sha256:
        raise PermissionDenied(
            f"registry.policy={given.source}: this registry's policy is stored in its database "
            f"(set by {row.set_by} at {row.set_at}) and differs; an admin changes it with "
            "`python -m jobs.registry policy set FILE`")
    return stored
