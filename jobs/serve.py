"""Serve a registry version on Ray Serve, and act on the app that serves it (conf/serve.yaml).

    python -m jobs.serve ref=adult_mlp                 # adult_mlp@production on 127.0.0.1:8000 (stays; make stop)
    python -m jobs.serve ref=adult_mlp ray.address=local   # on a throwaway Ray, until Ctrl-C
    python -m jobs.serve ref=adult_mlp action=rollout to=canary strategy=canary   # 10% -> 50% -> 100%
    python -m jobs.serve ref=adult_mlp action=rollout to=challenger strategy=shadow   # or ab, bluegreen
    python -m jobs.serve ref=adult_mlp action=status   # routing, per-version stats, cache, live AUC
    python -m jobs.serve ref=adult_mlp action=drift    # per-feature drift table
    python -m jobs.serve ref=adult_mlp action=rollback # traffic back to the previous stable version
    python -m jobs.serve ref=adult_mlp action=export out=serve_config.yaml   # `serve deploy` / RayService

`ref` is name@alias, name:VERSION, or a bare name (= @production). By default the app runs on
this checkout's warm Ray and stays after this process ends; other actions act on it there
(ray.address names another cluster). Exit codes: 0 ok, 2 bad config, 6 unknown
model/version/alias, 7 denied, 10 a deployment failed or a canary was rolled back.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from mlops_ray.errors import ConfigError, user_errors

if TYPE_CHECKING:
    from mlops_ray.config.serve import ServeJob
    from mlops_ray.registry import Registry


def log(line: str) -> None:
    print(line, flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from mlops_ray.config.compose import validated
        from mlops_ray.config.serve import ServeJob
        job = validated(cfg, ServeJob)
        if job.action not in ("serve", "export") and job.ray.address is None:
            from mlops_ray import warm
            if not warm.running():  # nothing to act on: never start a cluster for that
                raise ConfigError(f"action={job.action}: this checkout's warm Ray is not "
                                  "running (serve the model first, or name the cluster with "
                                  "ray.address)")
        if job.serve.detach and job.ray.address == "local":
            raise ConfigError("serve.detach=true with ray.address=local: a Ray started in this "
                              "process stops when it exits (leave ray.address unset: the warm "
                              "Ray keeps the app)")
        from mlops_ray.registry import open_registry
        reg = open_registry(job)
        if job.action == "export":  # no Ray needed: resolve the ref, write the Serve config
            from mlops_ray.serving import control
            export(job, control.export_config(job, reg))
            return
        if job.action == "serve":
            reg.get(job.ref)  # a bad name fails before Ray starts
        act(job, reg)


def act(job: ServeJob, reg: Registry) -> None:
    from mlops_ray.serving import control, rollout
    facts = control.start(job)
    if job.action == "serve":
        from mlops_ray.runtime import serve_until_stopped, stop_serving
        try:
            rollout.serve_ref(job, reg)
            url = control.direct_endpoint(job) or job.endpoint()
            log(f"endpoint   {url}/predict  {url}/v2/models/{job.model}/infer  {url}/docs\n"
                + (f"proxy      {job.endpoint()}/predict (Serve's HTTP proxy, one hop more)\n"
                   if url != job.endpoint() else "")
                + f"dashboard  {facts['dashboard_url'] or '(see the cluster)'}")
            if job.serve.detach or job.ray.address != "local":
                if job.ray.address is None:
                    log("the app stays on this checkout's warm Ray (make stop: stop it)")
                return
            serve_until_stopped(log, announce=False)
        except KeyboardInterrupt:  # Ctrl-C while the app was still starting
            if job.ray.address != "local":
                raise  # other apps may run on a warm or shared cluster: leave Serve be
            stop_serving(log)
    elif job.action == "rollout":
        rollout.rollout(job, reg, job.to or "canary", job.strategy or job.serve.rollout.strategy)
    elif job.action == "status":
        from ray import serve
        st = control.stats(job)
        apps = {k: v.status for k, v in serve.status().applications.items()}
        print(json.dumps({"applications": apps, **st}, indent=1, default=str))
    elif job.action == "drift":
        from mlops_ray.evaluation.drift import format_table
        for ref, rows in control.drift(job).items():
            print(f"{ref}\n{format_table(rows)}\n")
    elif job.action == "rollback":
        rollout.rollback(job, reg)


def export(job: ServeJob, config: dict) -> None:
    import yaml
    auth = job.serve.auth
    if auth.api_keys or auth.key_file:
        print(f"note: API keys are not written into the file; the replicas read them from "
              f"${auth.api_keys_env} (a Kubernetes secret, or runtime_env env_vars)",
              file=sys.stderr)
    text = yaml.safe_dump(config, sort_keys=False)
    if not job.out:
        print(text, end="")
        return
    out = Path(job.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    arm = config["applications"][0]["deployments"][0]["user_config"]["arms"][0]
    print(f"wrote {out}: {arm['ref']} ({arm['artifact_uri']}); deploy with `serve deploy {out}` "
          "or paste it into cluster/kuberay/rayservice.yaml's serveConfigV2")


if __name__ == "__main__":
    from mlops_ray.runtime import run_main
    run_main(main)
