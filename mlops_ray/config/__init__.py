"""Composed Hydra config -> plain dict -> validated pydantic model.

The only package that imports Hydra/OmegaConf. Only plain dicts cross into Ray.
"""
from __future__ import annotations

import contextlib
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mlops_ray.errors import ConfigError, MlopsError

M = TypeVar("M", bound=BaseModel)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def to_dict(cfg: Any) -> dict[str, Any]:
    """OmegaConf -> plain dict with interpolations resolved (drops the `hydra` node)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:  # `???` left in the composed config
            key = getattr(e, "full_key", None) or str(e).splitlines()[0]
            raise ConfigError(f"{key}: required key is missing (give {key}=...)") from None
    return {k: v for k, v in dict(cfg).items() if k != "hydra"}


def _allowed_keys(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names allowed at `loc` (the parent of an unknown key), for the error message."""
    model: Any = schema
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in typing.get_args(ann) if isinstance(a, type)
                      and issubclass(a, BaseModel)), ann)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(f.alias or n for n, f in model.model_fields.items())
    return None


def explain(err: ValidationError, schema: type[BaseModel]) -> list[str]:
    """One line per problem: the key, the value given and what is allowed."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<config>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, loc[:-1])
            hint = f" (allowed keys here: {', '.join(allowed)})" if allowed else ""
            out.append(f"{key}: unknown key (value {e['input']!r}){hint}")
        elif e["type"] == "value_error" and not loc or e["type"] == "value_error" \
                and "; " in str(e.get("msg", "")):
            msg = str(e["msg"]).removeprefix("Value error, ")
            out += [f"{key + ': ' if loc else ''}{m}" for m in msg.split("; ")]
        elif e["type"] == "missing":
            out.append(f"{key}: required key is missing")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            out.append(f"{key}={e['input']!r}: {msg}")
    return out


def validate(cfg: Any, schema: type[M]) -> M:
    """Validate a composed config (DictConfig or dict) against a job schema; ConfigError if bad."""
    data = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e, schema)) from None


def compose(config_name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose `conf/<config_name>.yaml` with overrides, as the jobs do (tests, notebooks)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_dict(_compose(config_name=config_name, overrides=overrides or []))


def compose_with_model(config_name: str, args: list[str],
                       required: dict[str, str]) -> dict[str, Any]:
    """Compose a job whose `model=` names a registry model or ref (jobs.serve, export, predict).
    `model` is also the config group of the network, which Hydra would try to select, so it is
    set after composition. `required`: key -> hint, each missing one named in the error."""
    refs = [a.split("=", 1)[1] for a in args if a.startswith("model=")]
    cfg = compose(config_name, [a for a in args if not a.startswith("model=")])
    if refs:
        cfg["model"] = refs[-1]
    missing = [f"{k}: required ({hint})" for k, hint in required.items() if cfg.get(k) is None]
    if missing:
        raise ConfigError(missing)
    return cfg


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn typed errors into one message on stderr and the error's exit code (no traceback)."""
    try:
        yield
    except MlopsError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
