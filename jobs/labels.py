"""Import late labels into the label log, joined with logged predictions at retraining time.

    python -m jobs.labels +experiment=adult_mlp file=outcomes_2026-11.csv
    python -m jobs.labels +experiment=adult_mlp file=s3://bucket/outcomes.parquet storage=s3

The file holds request_id (as /predict answered it), label (0/1), time (when the outcome became
known; the point-in-time join uses it) and optionally row. It is validated whole first: a bad
value names its row and column, exits 2 and writes nothing. Importing the same file twice writes
the same part (no duplicates).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="labels")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.pipeline import LabelsJob
        from mlops_ray.pipeline.traffic import import_labels
        import_labels(validated(cfg, LabelsJob))


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
