"""Plain torch.nn.Modules (no Ray, no Hydra)."""
from mlops_ray.models.mlp import MLP

__all__ = ["MLP"]
from mlops_ray.models.gpt import GPT, GPTConfig  # noqa: E402

__all__ += ["GPT", "GPTConfig"]
