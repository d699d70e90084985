"""mlops_ray: Hydra-configured ML training, tuning, gating and serving on Ray.

The core (`data`, `models`, `evaluation`) imports neither Ray nor Hydra; `train`, `tune` and
`serving` import Ray where they use it; `config` is the only package that imports Hydra.
"""
__version__ = "0.1.0"
