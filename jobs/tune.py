"""Tune hyper-parameters with Optuna inside Ray Tune (conf/tune.yaml).

    python -m jobs.tune +experiment=adult_mlp                          # TPE + ASHA, parallel trials
    python -m jobs.tune +experiment=adult_xgboost                      # the gates as Optuna constraints (default)
    python -m jobs.tune +experiment=adult_xgboost tune.gate_aware=false     # the metric alone
    python -m jobs.tune +experiment=adult_mlp tune.num_samples=64 tune.max_concurrent_trials=8 scaling.num_workers=2
    python -m jobs.tune +experiment=adult_mlp search=random scheduler=fifo   # baselines
    python -m jobs.train +experiment=adult_mlp from_tune=outputs/tune/<study>  # retrain the best

Rerunning the same command after a crash resumes the study: finished trials are kept, running
ones resume from their checkpoints, and the total stays tune.num_samples.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.tune import TuneJob
        job = validated(cfg, TuneJob)
        from mlops_ray.cluster.submit import submit_if_remote
        submit_if_remote("jobs.tune", job)  # cluster=remote: run there, exit with its status
        from mlops_ray.tune.tuner import run_tuning, summary_lines
        summary = run_tuning(job)
        print("\n".join(summary_lines(summary)), flush=True)


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
