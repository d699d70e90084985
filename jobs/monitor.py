"""Watch the production deployment; retrain through the pipeline's gates when it drifts.

    python -m jobs.monitor +experiment=adult_mlp monitor.new_data=data/adult_2027q1.parquet
    python -m jobs.monitor +experiment=adult_mlp monitor.new_data=s3://bucket/adult/latest.parquet \
        monitor.interval_s=300 monitor.min_live_auc=0.85 ray.address=auto storage=s3 ...
    python -m jobs.monitor +experiment=adult_mlp monitor.new_data=... monitor.once=true   # cron / CI

Joins the cluster serving `<name>` (ray.address, default auto: `make run`'s). When at least
monitor.max_drifted_features features alert (serve.drift thresholds) or the AUC on labelled
feedback falls below monitor.min_live_auc, it runs jobs.pipeline on monitor.new_data: the new
model meets the same gates and, if it passes, replaces production by a canary rollout. Trigger
and outcome are in `python -m jobs.registry history <name>`. Exit (with monitor.once=true): 0
nothing to do or promoted, 5 refused by the gates, 10 deployment failed and rolled back.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="monitor")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.pipeline import MonitorJob
        job = validated(cfg, MonitorJob)
        from mlops_ray.pipeline.monitor import monitor
        sys.exit(monitor(job))


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
