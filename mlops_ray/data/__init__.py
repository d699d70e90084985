"""Datasets: loading (builtin, local, s3://), schema validation, content hashing, splits and
preprocessing fitted on training rows only. No Ray, no Hydra."""
from mlops_ray.data.io import dataset_version, load_table
from mlops_ray.data.prepare import Prepared, prepare
from mlops_ray.data.preprocess import Preprocessor
from mlops_ray.data.validate import validate_frame

__all__ = ["Prepared", "Preprocessor", "dataset_version", "load_table", "prepare",
           "validate_frame"]
