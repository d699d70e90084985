"""Score a dataset with a registry version on Ray Data (batch inference), with a drift report.

    python -m jobs.predict ref=adult_mlp@production input=new_rows.parquet output=outputs/scored
    python -m jobs.predict ref=adult_mlp:3 input=data/ output=outputs/scored predict.format=csv
    python -m jobs.predict ref=adult_mlp input=rows.csv output=out predict.id_column=customer_id
    python -m jobs.predict ref=adult_mlp input=s3://bucket/new/ output=s3://bucket/scored \
        storage.uri=s3://bucket/mlops db.url=postgresql://... ray.address=auto
    python -m jobs.predict ref=adult_mlp input=big.parquet output=out \
        'predict.concurrency=[1,4]' predict.num_cpus=1 predict.batch_size=8192

Writes <output>/predictions/part-*.parquet (row id, probability, label at the version's
threshold, model ref, content hash), <output>/drift_report.json and, last, <output>/_SUCCESS;
prints a summary with the drift table. Row ids: predict.id_column when set, else source_file
(path relative to the input) + source_row (0-based data row in that file). Exit codes: 0 ok,
2 bad config or storage, 3 input does not match the model's signature (every missing column
named), 6 unknown model/version/alias, 7 denied.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.batch import PredictJob
        from mlops_ray.config.compose import validated
        job = validated(cfg, PredictJob)
        from mlops_ray.predict.job import run
        run(job, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
