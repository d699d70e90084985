"""Training overhead of jobs.train (Ray Train V2) against a bare PyTorch loop, in one run.

    python bench/train_overhead.py            # Adult, MLP 256-256, batch 512, 10 epochs, 1 thread
    python bench/train_overhead.py --arms warm --env RAY_worker_maximum_startup_concurrency=4

Every arm runs `--runs` times (default 3) and reports the median and the spread (min-max) of
steady-state samples/s (epochs 2..N, counted between consecutive reports, so reporting and
per-epoch checkpointing are included), whole-process wall time, their ratios to the bare
loop's medians, and the run record's `startup` phases (data, Ray, fit() -> train function on
rank 0, -> first optimizer step). Arms:
  bare   the same data, model, optimiser, schedule and thread count in one process, no Ray
  loop   jobs.train's per-worker loop called in one process without Ray (as a CV fold runs
         it: validation metrics and a checkpoint every epoch), its own cost apart from Ray's
  local  `python -m jobs.train ray.address=local`: a throwaway Ray inside the job ("before")
  warm   `python -m jobs.train` on the warm local Ray of a temporary MLOPS_RAY_WARM_DIR: the
         first job starts it (reported alone, "cold"), then `--runs` jobs attach ("after");
         the cluster is stopped at the end. After each attached run the State API of the warm
         cluster splits fit() -> train function into controller / placement group / worker
         group (Ray's task events and placement-group stats). Jobs run back to back: the
         pool of idle workers (mlops_ray/pool.py) refills between them only as far as it can.
  pool   as warm, on the same cluster, each job started once the pool is full again (as when
         jobs are started by hand, seconds apart); the wait is not counted
`--paired` runs the bare loop again just before each job of the local and pool arms and reports
the ratio of each pair: the host's speed drifts (the bare loop's own runs have spread 20%),
so a ratio to the bare runs of minutes before may show that drift rather than the job's cost.
Each job trains from scratch (a fresh storage.uri per run). `--env K=V` goes into the jobs'
environment (and so into the warm cluster's raylet, which the first job starts).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHASES = ("data_s", "ray_s", "to_workers_s", "to_first_step_s")
SPLIT = ("controller_s", "placement_group_s", "worker_actors_s", "train_setup_s")


def bare(epochs: int, batch: int) -> dict:
    """The same data, model, optimiser, schedule and thread count as jobs.train, no Ray."""
    import torch

    from mlops_ray.config.compose import compose
    from mlops_ray.config.train import DatasetCfg
    from mlops_ray.data import prepare
    from mlops_ray.models.mlp import MLP
    torch.set_num_threads(1)
    cfg = compose("train", ["+experiment=adult_mlp"])
    p = prepare(DatasetCfg.model_validate(cfg["dataset"]), cfg["seed"])
    (x, y), (xv, yv) = p.xy("train"), p.xy("val")
    x, y, xv, yv = map(torch.tensor, (x, y, xv, yv))
    torch.manual_seed(0)
    net = MLP(x.shape[1], cfg["model"]["hidden"], cfg["model"]["dropout"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["optim"]["lr"],
                            weight_decay=cfg["optim"]["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    steps, stamps = len(x) // batch, []
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            net.eval()
            torch.nn.functional.binary_cross_entropy_with_logits(net(xv), yv)
            net.train()
        stamps.append(time.time())
    return {"samples_per_s": steps * batch * (len(stamps) - 2) / (stamps[-1] - stamps[1])}


def loop(epochs: int, batch: int) -> dict:
    """jobs.train's per-worker loop (train/tasks/tabular.py) on the same job, no Ray."""
    from mlops_ray.config import validate
    from mlops_ray.config.compose import compose
    from mlops_ray.config.train import TrainJob
    from mlops_ray.data import prepare
    from mlops_ray.train.session import LocalSession
    from mlops_ray.train.tasks.tabular import arrays, loop_config, train_loop_per_worker
    job = validate(compose("train", ["+experiment=adult_mlp", "tracking=none",
                                     "train.early_stopping=null", f"train.epochs={epochs}",
                                     "train.torch_threads=1"]), TrainJob)
    p = prepare(job.dataset, job.seed)
    cfg = loop_config(job, p.preprocessor.feature_names, p.preprocessor.to_dict(), "bench")
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as d:
        out = train_loop_per_worker(cfg.plain(), LocalSession(d, arrays(
            p, job.penalty_attribute())))
    at = [m["time/at"] for m in out["history"]]
    steps = len(p.splits["train"]) // batch
    return {"samples_per_s": steps * batch * (len(at) - 2) / (at[-1] - at[1])}


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t, out


def job_run(job: list[str], env: dict, batch: int) -> dict:
    """One jobs.train process on a fresh storage.uri: wall, steady samples/s, startup."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as d:
        wall, _ = timed([*job, f"storage.uri={d}"], env)
        (rec,) = [json.loads(p.read_text()) for p in Path(d).glob("runs/*/run.json")]
    if rec.get("restored_from"):
        sys.exit("a bench run resumed instead of training from scratch")
    at = [m["time/at"] for m in rec["history"]]
    steps = rec["dataset"]["splits"]["train"] // batch
    return {"samples_per_s": steps * batch * (len(at) - 2) / (at[-1] - at[1]), "wall_s": wall,
            **(rec.get("startup") or {})}


def split_fit_start(folder: Path, to_workers_s: float | None) -> dict:
    """fit() -> train function, split by the warm cluster's State API for its newest Train run:
    controller (fit() until TrainController.__init__ returned), placement group (its
    creation latency), worker actors (placement group created -> the last RayTrainWorker's
    __init__ returned: their processes start and import), train setup (-> run_train_fn runs:
    Train's context, data set-up, torch process group)."""
    from mlops_ray import warm
    os.environ.update(warm.client_env(folder))
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    _enable_token_auth()
    from ray.util.state import list_placement_groups, list_tasks
    url = warm.read_state(folder)["dashboard_url"]
    kw = {"address": url, "raise_on_missing_output": False, "limit": 10_000}

    def events(t: dict) -> dict:
        return {e["state"]: e["created_ms"] / 1000 for e in t.get("events") or []}
    ctl = list_tasks(filters=[("name", "=", "TrainController.__init__")], detail=True, **kw)
    job_id = max(ctl, key=lambda t: t["creation_time_ms"])["job_id"]
    tasks = list_tasks(filters=[("job_id", "=", job_id)], detail=True, **kw)
    by_name: dict[str, list[dict]] = {}
    for t in tasks:
        by_name.setdefault(t["name"], []).append(events(t))
    (pg,) = [p["stats"] for p in list_placement_groups(detail=True, **kw)
             if p["creator_job_id"] == job_id] or [None]
    ctl_done = by_name["TrainController.__init__"][0]["FINISHED"]
    entered = min(e["RUNNING"] for e in by_name["RayTrainWorker.run_train_fn"])
    workers_up = max(e["FINISHED"] for e in by_name["RayTrainWorker.__init__"])
    pg_asked = int(pg["creation_request_received_ns"]) / 1e9
    pg_done = pg_asked + int(pg["end_to_end_creation_latency_us"]) / 1e6
    t_fit = entered - to_workers_s if to_workers_s is not None else \
        by_name["TrainController.__init__"][0]["PENDING_ARGS_AVAIL"]
    return {"controller_s": pg_asked - t_fit, "placement_group_s": pg_done - pg_asked,
            "worker_actors_s": workers_up - pg_done, "train_setup_s": entered - workers_up,
            "controller_init_s": ctl_done - t_fit}


def summary(rows: list[dict], key: str) -> tuple[float, float, float] | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="runs per arm (medians and spreads)")
    ap.add_argument("--arms", default="bare,loop,local,warm,pool",
                    help="of bare,loop,local,warm,pool")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the jobs (and of the warm cluster they start)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more jobs.train overrides")
    ap.add_argument("--no-split", action="store_true", help="skip the State API split")
    ap.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    ap.add_argument("--paired", action="store_true",
                    help="a bare run just before each job of the local and pool arms, and "
                         "ratios per pair (the host's speed drifts between arms)")
    ap.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batch = 512
    if a.bare_only:
        print(json.dumps(bare(a.epochs, batch)))
        return
    if a.loop_only:
        print(json.dumps(loop(a.epochs, batch)))
        return
    arms = a.arms.split(",")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           **dict(kv.split("=", 1) for kv in a.env)}
    for k in ("RAY_ADDRESS", "MLOPS_RAY_WARM_DIR"):
        env.pop(k, None)
    job = [sys.executable, "-m", "jobs.train", "+experiment=adult_mlp", "tracking=none",
           "train.early_stopping=null", f"train.epochs={a.epochs}", "train.torch_threads=1",
           *a.set]
    res: dict[str, list[dict]] = {}

    def in_process(arm: str) -> dict:
        wall, out = timed([sys.executable, __file__, f"--{arm}-only", f"--epochs={a.epochs}"],
                          env)
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": wall}

    def paired(run: Callable[[], dict]) -> dict:
        """`run()`, after a bare run of its own when --paired (kept with it as `pair`)."""
        if not a.paired:
            return run()
        b = in_process("bare")
        res.setdefault("bare", []).append(b)
        return {**run(), "pair": b}
    for arm in ("bare", "loop"):
        if arm in arms:
            res.setdefault(arm, []).extend(in_process(arm) for _ in range(a.runs))
    if "local" in arms:
        res["local"] = [paired(lambda: job_run([*job, "ray.address=local"], env, batch))
                        for _ in range(a.runs)]
    if "warm" in arms or "pool" in arms:
        from mlops_ray import pool, warm
        folder = Path(tempfile.mkdtemp(prefix="bench-warm-"))
        wenv = {**env, "MLOPS_RAY_WARM_DIR": str(folder)}
        try:
            res["warm cold"] = [job_run(job, wenv, batch)]
            for arm in ("warm", "pool"):
                if arm not in arms:
                    continue
                res[arm] = []
                for _ in range(a.runs):
                    if arm == "pool":
                        pool.wait_full(warm.read_state(folder)["temp_dir"])
                        r = paired(lambda: job_run(job, wenv, batch))
                    else:
                        r = job_run(job, wenv, batch)
                    if not a.no_split:
                        r.update(split_fit_start(folder, r.get("to_workers_s")))
                    res[arm].append(r)
        finally:
            warm.stop(folder, quiet=True)
            shutil.rmtree(folder, ignore_errors=True)
    report(res, a)


def report(res: dict[str, list[dict]], a: argparse.Namespace) -> None:
    names = {"bare": "bare PyTorch loop", "loop": "jobs.train's loop in one process, no Ray",
             "local": "jobs.train ray.address=local (own Ray)",
             "warm cold": "jobs.train, warm cluster, 1st run (starts it)",
             "warm": "jobs.train, warm cluster, attached",
             "pool": "jobs.train, warm cluster, pool refilled"}
    base = {k: summary(res["bare"], k)[0] for k in ("samples_per_s", "wall_s")} \
        if "bare" in res else None

    def cell(s: tuple | None, fmt: str) -> str:
        if not s:
            return "-"
        return format(s[0], fmt) + (f" ({format(s[1], fmt)}-{format(s[2], fmt)})"
                                    if s[1] != s[2] else "")
    print(f"Adult, MLP 256-256, batch 512, {a.epochs} epochs, 1 torch thread; median "
          f"(min-max) of {a.runs} runs" + (f"; env {' '.join(a.env)}" if a.env else ""))
    print(f"{'arm':<48} {'n':>2} {'samples/s':>24} {'ratio':>5} {'process s':>18} {'ratio':>5}")
    for arm, rows in res.items():
        sps, wall = summary(rows, "samples_per_s"), summary(rows, "wall_s")
        r1 = f"{sps[0] / base['samples_per_s']:.2f}" if base else "-"
        r2 = f"{wall[0] / base['wall_s']:.2f}" if base else "-"
        print(f"{names[arm]:<48} {len(rows):>2} {cell(sps, ',.0f'):>24} {r1:>5} "
              f"{cell(wall, '.1f'):>18} {r2:>5}")
    print("startup phases, s (run.json `startup`): median (min-max)")
    print(f"{'arm':<48} " + " ".join(f"{p.removesuffix('_s'):>16}" for p in PHASES))
    for arm, rows in res.items():
        if arm not in ("bare", "loop"):
            print(f"{names[arm]:<48} " + " ".join(f"{cell(summary(rows, p), '.1f'):>16}"
                                                  for p in PHASES))
    pairs = {arm: rows for arm, rows in res.items() if rows and all("pair" in r for r in rows)}
    if pairs:
        print("paired: each job / the bare run just before it, median (min-max) of the pairs")
        for arm, rows in pairs.items():
            ratios = [{"sps": r["samples_per_s"] / r["pair"]["samples_per_s"],
                       "wall": r["wall_s"] / r["pair"]["wall_s"]}
                      for r in rows if r.get("samples_per_s")]
            print(f"{names[arm]:<48} samples/s {cell(summary(ratios, 'sps'), '.2f')}, "
                  f"process {cell(summary(ratios, 'wall'), '.2f')}")
    for arm in ("warm", "pool"):
        if any(r.get(SPLIT[0]) is not None for r in res.get(arm, [])):
            print(f"to_workers split (State API, {names[arm].split(', ', 1)[1]}): " + ", ".join(
                f"{p.removesuffix('_s').replace('_', ' ')} {cell(summary(res[arm], p), '.2f')}"
                for p in SPLIT))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": res}, indent=1))


if __name__ == "__main__":
    main()
