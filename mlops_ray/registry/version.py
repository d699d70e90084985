"""A registry version as callers see it, and the grammar of references to one
(`name`, `name@alias`, `name:3`). No database, no Ray."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mlops_ray.errors import RegistryError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class Version:
    model: str
    version: int
    content_hash: str
    artifact_uri: str
    run_uri: str | None
    run_name: str | None
    data_version: str | None
    dataset_uri: str | None
    config_hash: str | None
    code_version: dict | None
    study: dict | None
    gate_passed: bool
    champion_run: str | None
    metrics: dict
    status: str
    created_at: str
    created_by: str
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """'name' | 'name@alias' | 'name:3' -> (name, alias, version)."""
    name, alias, version = ref, None, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif ":" in ref:
        name, v = ref.split(":", 1)
        if not v.isdigit():
            raise RegistryError(f"'{ref}': version must be a number (name:3), got '{v}'")
        version = int(v)
    check_name(name, "model name")
    if alias is not None:
        check_name(alias, "alias")
    return name, alias, version


def check_name(value: str, what: str) -> str:
    if not NAME.match(value or ""):
        raise RegistryError(f"{what} {value!r}: use letters, digits, '_', '-', '.' (max 128, "
                            "starting with a letter or digit)")
    return value
