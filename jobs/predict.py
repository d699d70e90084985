"""Score a dataset with a registry version on Ray Data (batch inference), with a drift report.

    python -m jobs.predict model=adult_mlp@production input=new_rows.parquet output=outputs/scored
    python -m jobs.predict model=adult_mlp:3 input=data/ output=outputs/scored predict.format=csv
    python -m jobs.predict model=adult_mlp input=rows.csv output=out predict.id_column=customer_id
    python -m jobs.predict model=adult_mlp input=s3://bucket/new/ output=s3://bucket/scored \
        storage.uri=s3://bucket/mlops db.url=postgresql://... ray.address=auto
    python -m jobs.predict model=adult_mlp input=big.parquet output=out \
        predict.concurrency=[1,4] predict.num_cpus=1 predict.batch_size=8192

Writes <output>/predictions/part-*.parquet (row id, probability, label at the version's
threshold, model ref, content hash), <output>/drift_report.json and, last, <output>/_SUCCESS;
prints a summary with the drift table. Row ids: predict.id_column when set, else source_file
(path relative to the input) + source_row (0-based data row in that file). Exit codes: 0 ok,
2 bad config or storage, 3 input does not match the model's signature (every missing column
named), 6 unknown model/version/alias, 7 denied.
"""
from __future__ import annotations

import sys

from mlops_ray.config import compose_with_model, user_errors, validate
from mlops_ray.config.schema import PredictJobCfg


def job_from_args(args: list[str]) -> dict:
    """conf/predict.yaml with `model=REF`, a registry ref."""
    cfg = compose_with_model("predict", args, {
        "model": "the registry version, e.g. model=adult_mlp@production",
        "input": "a .parquet/.csv file or folder, local or s3://",
        "output": "the folder to write predictions into"})
    return validate(cfg, PredictJobCfg).model_dump(by_alias=True)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    bad = [a for a in args if "=" not in a]
    if bad:
        print(f"error: unknown argument(s) {bad}; settings are key=value (model=adult_mlp@"
              "production input=PATH output=PATH)", file=sys.stderr)
        sys.exit(2)
    with user_errors():
        job = job_from_args(args)
        from mlops_ray.predict.job import run
        run(job, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
