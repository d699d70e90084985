"""The whole way to production: train (or tune) -> evaluate -> promote -> deploy -> smoke test.

    make run                                              # = python -m jobs.pipeline +experiment=adult_mlp
    python -m jobs.pipeline +experiment=adult_mlp stages=[train,evaluate,promote,deploy]
    python -m jobs.pipeline +experiment=adult_mlp tune=true tune.num_samples=6   # tuning first
    python -m jobs.pipeline +experiment=adult_mlp serve.keep_alive=false         # exit after the smoke test
    python -m jobs.pipeline +experiment=adult_mlp ray.address=auto   # deploy onto a running cluster (stays)
    python -m jobs.pipeline +experiment=german_mlp run=outputs/runs/<run> stages=[evaluate,promote]

Rerunning the same command skips every stage whose output exists for the same inputs and resumes
the one that was interrupted. On a local Ray the model stays served until Ctrl-C (unless
serve.keep_alive=false). Exit 5: the gates refused the candidate (production unchanged);
10: deployment, canary or smoke test failed (production rolled back).
"""
from __future__ import annotations

import signal
import sys
import threading

import hydra
from omegaconf import DictConfig

from mlops_ray.config import user_errors, validate
from mlops_ray.config.schema import PipelineJobCfg


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    with user_errors():
        job = validate(cfg, PipelineJobCfg).model_dump(by_alias=True)
        from mlops_ray.cluster.submit import submit_if_remote
        submit_if_remote("jobs.pipeline", job)  # cluster=remote: run there, exit with its status
        from mlops_ray.pipeline.run import run_pipeline, summary_lines
        out = run_pipeline(job)
        print("\n".join(summary_lines(out)), flush=True)
        if "deploy" in job["stages"] and job["serve"]["keep_alive"] and not job["ray"]["address"]:
            keep_serving()


def keep_serving() -> None:
    """The local Ray (and the app) lives as long as this process: wait for Ctrl-C / SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("serving until Ctrl-C", flush=True)
    while not stop.wait(0.5):
        pass
    import ray
    from ray import serve
    print("stopping", flush=True)
    serve.shutdown()
    ray.shutdown()
    print("stopped", flush=True)


def cli_args(argv: list[str]) -> list[str]:
    """`tune=true|false` is shorthand for tune.enabled (`tune` is also a config group)."""
    return [f"tune.enabled={a.split('=', 1)[1]}" if a.split("=", 1)[0] in ("tune", "+tune")
            else a for a in argv]


if __name__ == "__main__":
    sys.argv[1:] = cli_args(sys.argv[1:])
    main()
