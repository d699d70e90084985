"""The whole way to production: train (or tune) -> evaluate -> promote -> deploy -> smoke test.

    make run                                              # = python -m jobs.pipeline +experiment=adult_mlp
    python -m jobs.pipeline +experiment=adult_mlp stages=[train,evaluate,promote,deploy]
    python -m jobs.pipeline +experiment=adult_mlp tune.enabled=true tune.num_samples=6   # tuning first
    python -m jobs.pipeline +experiment=adult_mlp candidates=[mlp,xgboost]        # race model families
    python -m jobs.pipeline +experiment=adult_mlp ray.address=local  # a throwaway Ray: serves until Ctrl-C
    python -m jobs.pipeline +experiment=adult_mlp ray.address=auto   # deploy onto a running cluster (stays)
    python -m jobs.pipeline +experiment=german_mlp run=outputs/runs/<run> stages=[evaluate,promote]

Rerunning the same command skips every stage whose output exists for the same inputs and resumes
the one that was interrupted. The model stays served on this checkout's warm Ray after the job
ends (`make stop` ends both); on a throwaway Ray (ray.address=local) until Ctrl-C, unless
serve.keep_alive=false. Exit 5: the gates refused the candidate (production unchanged);
10: deployment, canary or smoke test failed (production rolled back).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


def log(line: str) -> None:
    print(line, flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.pipeline import PipelineJob
        job = validated(cfg, PipelineJob)
        from mlops_ray.cluster.submit import submit_if_remote
        submit_if_remote("jobs.pipeline", job)  # cluster=remote: run there, exit with its status
        from mlops_ray.pipeline.run import run_pipeline, summary_lines
        out = run_pipeline(job)
        log("\n".join(summary_lines(out)))
        if "deploy" in job.stages and job.ray.address is None:
            log("serving on this checkout's warm Ray after this job ends (make stop: stop it)")
        elif "deploy" in job.stages and job.serve.keep_alive and job.ray.address == "local":
            from mlops_ray.runtime import serve_until_stopped
            serve_until_stopped(log)


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
