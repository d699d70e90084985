"""Hydra's side of the config: compose `conf/<job>.yaml` with overrides and turn the result
into a plain dict. The only module that imports Hydra / OmegaConf."""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from mlops_ray.config import validate
from mlops_ray.errors import ConfigError

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


def validated(cfg: Any, schema: type[M]) -> M:
    """A job's composed config (what @hydra.main hands it) checked against its schema."""
    return validate(to_dict(cfg), schema)


def compose(config_name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose `conf/<config_name>.yaml` with overrides, as the jobs do (tests, notebooks)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_dict(_compose(config_name=config_name, overrides=overrides or []))


def job(config_name: str, schema: type[M], overrides: list[str] | None = None) -> M:
    """compose + validate: the job's typed config from command-line style overrides."""
    return validate(compose(config_name, overrides), schema)


def group_option(group: str, option: str, field: str | None = None) -> dict[str, Any]:
    """One option of a config group on its own (`conf/<group>/<option>.yaml`), e.g. a pipeline
    candidate's model; ConfigError naming `field`, the value and the options there are."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not option.replace("_", "").replace("-", "").isalnum() or not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{field or group}: {option!r} is not an option of conf/{group}/ "
                          f"(allowed: {', '.join(options)})")
    from omegaconf import OmegaConf
    return to_dict(OmegaConf.load(path))
