"""Serve registry versions on Ray Serve, roll them out and back.

    python -m jobs.serve model=adult_mlp                  # adult_mlp@production on 127.0.0.1:8000 until Ctrl-C
    python -m jobs.serve model=adult_mlp ray.address=auto serve.detach=true   # leave it on a running cluster
    python -m jobs.serve rollout model=adult_mlp to=canary strategy=canary    # 10% -> 50% -> 100%, auto rollback
    python -m jobs.serve rollout model=adult_mlp to=challenger strategy=shadow   # or ab, bluegreen
    python -m jobs.serve status model=adult_mlp
    python -m jobs.serve drift model=adult_mlp
    python -m jobs.serve rollback model=adult_mlp
    python -m jobs.serve export model=adult_mlp out=serve_config.yaml   # for serve deploy / a RayService

Verbs other than `serve` join the running cluster (ray.address=auto unless given). Every
traffic change is in `python -m jobs.registry history adult_mlp`. Exit 10 when a deployment
fails or a canary was rolled back.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from mlops_ray.config import compose_with_model, user_errors, validate
from mlops_ray.config.schema import ServeJobCfg
from mlops_ray.errors import ConfigError

VERBS = ("serve", "rollout", "status", "drift", "rollback", "export")


def job_from_args(args: list[str]) -> dict:
    """conf/serve.yaml with `model=NAME`, a registry model name."""
    cfg = compose_with_model("serve", args, {
        "model": "the registry model to serve, e.g. model=adult_mlp"})
    return validate(cfg, ServeJobCfg).model_dump(by_alias=True)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verb = args.pop(0) if args and args[0] in VERBS else "serve"
    bad = [a for a in args if "=" not in a]
    if bad:
        print(f"error: unknown argument(s) {bad}; verbs: {', '.join(VERBS)}; settings are "
              "key=value", file=sys.stderr)
        sys.exit(2)
    with user_errors():
        job = job_from_args(args)
        if verb != "serve" and not job["ray"]["address"]:
            job["ray"]["address"] = "auto"  # talk to the cluster that serves the app
        if job["serve"]["detach"] and not job["ray"]["address"]:
            raise ConfigError("serve.detach=true needs ray.address (a cluster that outlives "
                              "this process); a local Ray started here stops when it exits")
        from mlops_ray.registry import open_registry
        from mlops_ray.serving import control
        reg = open_registry(job)
        if verb == "export":  # no Ray needed: resolve the alias, write the Serve config file
            export(job, control.export_config(job, reg))
            return
        if verb == "serve":
            reg.get(f"{job['model']}@{job['alias']}")  # a bad name fails before Ray starts
        facts = control.start(job)
        s = job["serve"]
        if verb == "serve":
            try:
                control.serve_alias(job, reg, job["alias"])
                url = f"http://{s['host']}:{s['port']}{s['route_prefix'].rstrip('/')}"
                print(f"endpoint   {url}/predict  {url}/v2/models/{job['model']}/infer  "
                      f"{url}/docs\ndashboard  {facts['dashboard_url'] or '(see the cluster)'}",
                      flush=True)
                if s["detach"]:
                    return
                stop = threading.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, lambda *_: stop.set())
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:  # Ctrl-C while the app was still starting
                pass
            print("stopping", flush=True)
            import ray
            from ray import serve
            serve.shutdown()
            ray.shutdown()
            print("stopped", flush=True)
        elif verb == "rollout":
            to = job["to"] or "canary"
            control.rollout(job, reg, to, job["strategy"] or s["rollout"]["strategy"])
        elif verb == "status":
            from ray import serve
            st = control.stats(job)
            apps = {k: v.status for k, v in serve.status().applications.items()}
            print(json.dumps({"applications": apps, **st}, indent=1, default=str))
        elif verb == "drift":
            from mlops_ray.serving.drift import format_table
            for ref, rows in control.drift(job).items():
                print(f"{ref}\n{format_table(rows)}\n")
        elif verb == "rollback":
            control.rollback(job, reg)


def export(job: dict, config: dict) -> None:
    import yaml
    auth = job["serve"]["auth"]
    if auth["api_keys"] or auth["key_file"]:
        print(f"note: API keys are not written into the file; the replicas read them from "
              f"${auth['api_keys_env']} (a Kubernetes secret, or runtime_env env_vars)",
              file=sys.stderr)
    text = yaml.safe_dump(config, sort_keys=False)
    if not job["out"]:
        print(text, end="")
        return
    out = Path(job["out"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    arm = config["applications"][0]["deployments"][0]["user_config"]["arms"][0]
    print(f"wrote {out}: {arm['ref']} ({arm['artifact_uri']}); deploy with `serve deploy {out}` "
          "or paste it into cluster/kuberay/rayservice.yaml's serveConfigV2")


if __name__ == "__main__":
    main()
