"""Plain torch.nn.Modules (no Ray, no Hydra)."""
from mlops_ray.models.mlp import MLP

__all__ = ["MLP"]
