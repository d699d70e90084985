"""Plain torch.nn.Modules (no Ray, no Hydra; trees wrap their booster as one), and the allowlist of model builders.

A checkpoint or registry version names its model as `{_target_: <builder>, **arguments}`
(meta.json). Reading one back builds only a builder listed in BUILDERS, with plain JSON values
as arguments: an artifact is data, never code to import. A model of your own is one more entry
(`register_builder`), made by your code, never by an artifact."""
from collections.abc import Callable
from typing import Any

from mlops_ray.models.gpt import GPT, GPTConfig, build_gpt
from mlops_ray.models.mlp import MLP
from mlops_ray.models.trees import TARGET as TREES
from mlops_ray.models.trees import Trees

__all__ = ["BUILDERS", "GPT", "GPTConfig", "MLP", "Trees", "build_model", "register_builder"]

BUILDERS: dict[str, Callable[..., Any]] = {
    "mlops_ray.models.mlp.MLP": MLP,
    "mlops_ray.models.gpt.build_gpt": build_gpt,
    TREES: Trees,
}
_PLAIN = (str, int, float, bool, type(None))


def register_builder(target: str, fn: Callable[..., Any]) -> None:
    """Allow `target` (the `_target_` your config names) to be rebuilt from artifacts."""
    BUILDERS[target] = fn


def unsafe_spec(spec: Any) -> str | None:
    """Why a model spec read from an artifact may not be built (None: it may)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
        return "the model spec has no '_target_' name"
    target = spec["_target_"]
    if target not in BUILDERS:
        return (f"model _target_ {target!r} is not an allowed model builder (allowed: "
                f"{sorted(BUILDERS)}; mlops_ray.models.register_builder adds yours)")
    for k, v in spec.items():
        if k == "_target_":
            continue
        if k.startswith("_"):
            return f"model argument {k!r}: builder options such as _partial_ are not allowed"
        values = v if isinstance(v, list) else [v]
        if not all(isinstance(x, _PLAIN) for x in values):
            return (f"model argument {k!r}: only numbers, strings, booleans, null or lists of "
                    f"them are allowed, got {type(v).__name__}")
    return None


def build_model(spec: dict[str, Any], **extra: Any) -> Any:
    """The model a spec read from a checkpoint or registry version describes; UnsafeArtifact
    for a builder outside the allowlist or arguments that are not plain values."""
    why = unsafe_spec(spec)
    if why is not None:
        from mlops_ray.errors import UnsafeArtifact
        raise UnsafeArtifact(why)
    args = {k: v for k, v in spec.items() if k != "_target_"}
    return BUILDERS[spec["_target_"]](**args, **extra)
