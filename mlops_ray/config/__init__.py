"""Typed job configs: one pydantic model per job, composed from the section bundles of
`base` (where and how a job runs), `train`, `lm`, `tune`, `evaluate`, `serve`, `pipeline`
and `batch`. Jobs validate before anything starts; the typed model travels inside the library,
and only its `plain()` dict crosses into Ray. Hydra lives in `config.compose` alone."""
from __future__ import annotations

import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mlops_ray.errors import ConfigError

if typing.TYPE_CHECKING:
    from mlops_ray.config.train import RunSections

M = TypeVar("M", bound=BaseModel)


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
        elif e["type"] == "missing":
            out.append(f"{key}: required key is missing")
        elif e["type"] == "value_error" and (not loc or isinstance(e["input"], dict | list)
                                             or "; " in str(e.get("msg", ""))):
            # a section's own check: its message names the key and value; the section's
            # whole content would only bury it
            msg = str(e["msg"]).removeprefix("Value error, ")
            out += [m if not loc or m.startswith(key) else f"{key}: {m}"
                    for m in msg.split("; ")]
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            value = repr(e["input"])
            out.append(f"{key}={value if len(value) <= 80 else value[:77] + '...'}: {msg}")
    return out


def validate(data: dict[str, Any], schema: type[M]) -> M:
    """Validate a plain config dict against a job schema; ConfigError naming every problem."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e, schema)) from None


def train_job_schema(cfg: dict[str, Any]) -> type[RunSections]:
    """The schema jobs.train validates a composed config against (`task: lm` or tabular)."""
    if cfg.get("task") == "lm":
        from mlops_ray.config.lm import LmJob
        return LmJob
    from mlops_ray.config.train import TrainJob
    return TrainJob
