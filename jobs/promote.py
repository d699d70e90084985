"""Register a trained run and move `production` to it only if it passed the gates.

    python -m jobs.promote +experiment=adult_mlp run=outputs/runs/<run>        # or a tuning folder
    python -m jobs.promote +experiment=adult_mlp run=... promote.approval=manual
    python -m jobs.promote +experiment=adult_mlp run=... promote.force=true promote.reason='...'  # admin
    python -m jobs.promote +experiment=adult_mlp run=... db.url=postgresql://user@host/db storage=s3 ...

The run is (re)evaluated against the current production version first when its gate report was
not. Exit 0: registered (and production moved unless approval is manual); 5: registered, gates
failed, production unchanged; 7: the caller's role does not allow it; 8: another promotion moved
production meanwhile (nothing changed; run again).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import user_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="promote")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.evaluate import PromoteJob
        job = validated(cfg, PromoteJob)
        from mlops_ray.cluster.submit import submit_if_remote
        submit_if_remote("jobs.promote", job)  # cluster=remote: run there, exit with its status
        from mlops_ray.pipeline.promote import promote
        out = promote(job)
        print(out["table"])
        print(f"version    {out['model']}:{out['version']} ({out['artifact']})\n"
              f"production {out['production_before']} -> {out['production']}", flush=True)


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
