"""Wall time of `make run`'s pipeline (train -> evaluate -> promote -> deploy -> smoke) on a warm
local Ray that is already running, in one run, per stage.

    python bench/pipeline_wall.py                      # 3 pipelines, this checkout
    python bench/pipeline_wall.py --repo /tmp/before   # the same on another checkout (a commit
                                                       # to compare with, e.g. a git worktree)
    python bench/pipeline_wall.py --keep-serving       # each run deploys an app of its own and
                                                       # the earlier apps stay served
    python bench/pipeline_wall.py cv.during_training=false   # Hydra overrides for every run
    python bench/pipeline_wall.py --pool               # each run once the pool (mlops_ray/pool.py)
                                                       # is full again (the wait is not counted)

It starts a warm cluster of a temporary MLOPS_RAY_WARM_DIR with the checkout's conf/ray (its
start is not counted: "on the warm cluster"), then runs `python -m jobs.pipeline +experiment=adult_mlp` `--runs` times, each
with a fresh `storage.uri` so that nothing is reused, and stops Serve's app between runs (the
next one deploys from scratch, as after `make stop` + start, without Ray's start). It prints each
run's stage seconds and whole-process wall time, and their medians, and how many CV folds
were trained (or started) beside the training run; the cluster is stopped at
the end. Compare two commits by running it on both in the same session. `--keep-serving` is the
warm cluster as it is after an earlier `make run`: runs 2.. train and evaluate beside served apps
(serve.app_name=bench<i>, serve.route_prefix=/bench<i>; each replica holds 0.25 CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess  # nosec B404 - this venv's python, argument lists, no shell
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


KEEPER = """
import ray
from mlops_ray import pool, warm
from mlops_ray.runtime import ensure_ray
cfg = warm.conf_defaults()
ensure_ray({**cfg, "warm_pool": {}})
ray.get(pool.keeper().configure.remote(cfg["warm_pool"], pool.driver_env(),
                                       cfg["warm_pool_keep_alive_s"]))
"""


def serve_shutdown(env: dict[str, str], address: str) -> None:
    """Remove the served app (Serve's controller goes too): the next pipeline deploys anew."""
    code = (f"import ray; from ray import serve; ray.init(address={address!r}, "
            "_node_ip_address='127.0.0.1', logging_level='ERROR'); serve.shutdown()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True,  # nosec B603
                   capture_output=True, timeout=300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs")
    ap.add_argument("--experiment", default="adult_mlp")
    ap.add_argument("--keep-serving", action="store_true",
                    help="an app per run, left served: later runs share the cluster with them")
    ap.add_argument("--pool", action="store_true",
                    help="start each run once the pool of idle workers is full again")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    from mlops_ray import warm
    folder = Path(tempfile.mkdtemp(prefix="mlops-warm-"))
    env = {**os.environ, "MLOPS_RAY_WARM_DIR": str(folder), "PYTHONPATH": str(args.repo)}
    env.pop("RAY_ADDRESS", None)
    # the cluster's workers import the code of --repo too
    os.environ.update(MLOPS_RAY_WARM_DIR=str(folder), PYTHONPATH=str(args.repo))
    rows = []
    try:
        import yaml  # started as the first job of --repo would start it (its conf/ray)
        state = warm.ensure(yaml.safe_load((args.repo / "conf/ray/local.yaml").read_text()),
                            log=print)
        client = {**env, **warm.client_env(folder)}
        if args.pool:  # the keeper starts with a cluster's first job: start it, fill the pool
            subprocess.run([sys.executable, "-c", KEEPER], cwd=args.repo, env=client, check=True,
                           timeout=300)  # nosec B603
        for i in range(args.runs):
            if args.pool:
                from mlops_ray import pool
                pool.wait_full(state["temp_dir"])
            with tempfile.TemporaryDirectory() as store:
                t0 = time.perf_counter()
                out = subprocess.run(  # nosec B603
                    [sys.executable, "-m", "jobs.pipeline", f"+experiment={args.experiment}",
                     f"storage.uri={store}",
                     *([f"serve.app_name=bench{i}", f"serve.route_prefix=/bench{i}"]
                       if args.keep_serving else []), *args.overrides],
                    cwd=args.repo, env=env, capture_output=True, text=True, timeout=1200)
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    sys.exit(f"run {i}: exit {out.returncode}\n{(out.stdout + out.stderr)[-3000:]}")
                rec = json.loads(next(Path(store, "runs").glob("*/pipeline.json")).read_text())
            stages = {s["stage"]: s["seconds"] for s in rec["stages"]}
            beside = sum("beside the run)" in line for line in out.stdout.splitlines())
            rows.append({"wall": wall, **stages, "folds beside": beside})
            print(f"run {i}: {wall:.1f} s  " + "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
                  + f"  folds beside the run {beside}", flush=True)
            if not args.keep_serving:
                serve_shutdown(client, state["address"])
    finally:
        warm.stop(folder, quiet=True)
    keys = list(rows[0])
    print(f"\n{args.repo} {' '.join(args.overrides)}: median (min-max) of {len(rows)} runs, "
          "seconds")
    for k in keys:
        v = [r[k] for r in rows]
        print(f"  {k:<9} {statistics.median(v):6.1f} ({min(v):.1f}-{max(v):.1f})")


if __name__ == "__main__":
    main()
