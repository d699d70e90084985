"""Validate a trained model: k-fold CV, held-out test, fairness (+ mitigation), champion, gates.

    python -m jobs.evaluate +experiment=adult_mlp run=outputs/runs/<run>          # or a tuning folder
    python -m jobs.evaluate +experiment=adult_mlp run=... gates=strict fairness.mitigation=none
    python -m jobs.evaluate +experiment=adult_mlp run=... champion=outputs/runs/<champion run>

Writes <run>/eval/gate_report.json and model_card.{md,html} with PNG plots, prints the verdict
table, and exits 0 when every gate passed, 5 otherwise (2/3 for bad config or data).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.evaluate import EvaluateJob
        job = validated(cfg, EvaluateJob)
        from mlops_ray.cluster.submit import submit_if_remote
        submit_if_remote("jobs.evaluate", job)  # cluster=remote: run there, exit with its status
        from mlops_ray.evaluation.gates import enforce, verdict_table
        from mlops_ray.pipeline.evaluate import run_evaluation
        report = run_evaluation(job)
        print(verdict_table(report["gates"]))
        print(f"report     {report['report_uri']}\nmodel card {report['model_card']}", flush=True)
        enforce(report)


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
