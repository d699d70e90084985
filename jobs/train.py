"""Train a model on Ray Train from the Hydra config in conf/train.yaml.

    python -m jobs.train +experiment=adult_mlp                   # local Ray, outputs/ folder
    python -m jobs.train +experiment=german_mlp scaling.num_workers=2
    python -m jobs.train +experiment=adult_xgboost                # gradient-boosted trees (or model=lightgbm)
    python -m jobs.train +experiment=adult_mlp storage=s3 storage.uri=s3://bucket/prefix
    python -m jobs.train +experiment=adult_mlp ray.address=auto   # join `ray start --head`
    python -m jobs.train +experiment=adult_mlp cluster=remote cluster.address=http://<head>:8265
    python -m jobs.train +experiment=adult_mlp --cfg job          # print the composed config
    python -m jobs.train +experiment=gpt_synthetic                # a GPT on synthetic tokens (task: lm)
    python -m jobs.train +experiment=gpt_synthetic lm=gpu scaling=gpu   # GPT-2 small, bf16, compiled

Rerunning the same command resumes from the run's last checkpoint.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config import train_job_schema, validate
        from mlops_ray.config.compose import to_dict
        data = to_dict(cfg)
        job = validate(data, train_job_schema(data))  # task: lm -> the LM job's schema
        from mlops_ray.cluster.submit import submit_if_remote
        submit_if_remote("jobs.train", job)  # cluster=remote: run there, exit with its status
        from mlops_ray.config.train import TrainJob
        if isinstance(job, TrainJob) and job.from_tune:  # a tuning run's best parameters
            from mlops_ray.tune.tuner import with_tuned_params
            job = with_tuned_params(job)
        from mlops_ray.train.driver import run_training, summary_lines
        record = run_training(job)
        print("\n".join(summary_lines(record)), flush=True)


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
