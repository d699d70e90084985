"""Boosting through jobs.train (Ray Train V2's XGBoostTrainer / LightGBMTrainer) against the
library's own train() on the same data in one process, measured in the same run.

    python bench/trees_overhead.py                      # Adult, XGBoost, 1000 rounds, 1 thread
    python bench/trees_overhead.py --library lightgbm

Steady state: rounds per second between the second and the last report of the run (so the
per-round callback, the reports every 100 rounds and a checkpoint at each are included; Ray's
start-up and the data's first load are not), against the same span of rounds of the bare
train() with the same parameters, thread count and validation set. Prints the ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_REPORT = 100


def job(library: str, rounds: int, storage: str, every: int | None = None):
    from mlops_ray.config import validate
    from mlops_ray.config.compose import compose
    from mlops_ray.config.train import TrainJob
    return validate(compose("train", [
        "+experiment=adult_mlp", f"model={library}", f"model.num_boost_round={rounds}",
        "model.early_stopping_rounds=null", f"model.rounds_per_report={PER_REPORT}",
        "tracking=none", "train.torch_threads=1", f"storage.uri={storage}",
        "name=bench_trees", *([f"model.checkpoint_every_n_rounds={every}"] if every else [])]),
        TrainJob)


def bare(library: str, rounds: int) -> dict:
    """library.train() on the prepared Adult arrays, timing each round."""
    from mlops_ray.data import prepare
    from mlops_ray.train.tasks.trees import library_params
    j = job(library, rounds, "/tmp/unused")
    p = prepare(j.dataset, j.seed)
    (x, y), (xv, yv) = p.xy("train"), p.xy("val")
    params = library_params(j.model.spec(), j.seed, 1, False)
    stamps: list[float] = []
    t0 = time.perf_counter()
    if library == "xgboost":
        import xgboost

        class Stamp(xgboost.callback.TrainingCallback):
            def after_iteration(self, model, epoch, evals_log) -> bool:
                stamps.append(time.perf_counter())
                return False
        xgboost.train(params, xgboost.DMatrix(x, label=y), rounds,
                      evals=[(xgboost.DMatrix(xv, label=yv), "val")], verbose_eval=False,
                      callbacks=[Stamp()])
    else:
        import lightgbm
        train = lightgbm.Dataset(x, label=y, params={"max_bin": params["max_bin"]})
        lightgbm.train(params, train, rounds,
                       valid_sets=[lightgbm.Dataset(xv, label=yv, reference=train)],
                       callbacks=[lambda env: stamps.append(time.perf_counter())])
    a, b = 2 * PER_REPORT, rounds  # the span the framework's rate is measured over
    return {"rounds_per_s": (b - a) / (stamps[b - 1] - stamps[a - 1]),
            "wall_s": time.perf_counter() - t0}


def framework(library: str, rounds: int, every: int | None) -> dict:
    import ray

    from mlops_ray.train.driver import run_training
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rec = run_training(job(library, rounds, d, every), log=lambda _: None)
        wall = time.perf_counter() - t0
    ray.shutdown()
    h = [m for m in rec["history"] if "time/at" in m]
    first, last = h[1], h[-1]  # from the second report: the run is warm
    ckpt = sorted(m["time/checkpoint_s"] for m in h[1:])
    return {"rounds_per_s": (last["round"] - first["round"]) / (last["time/at"] - first["time/at"]),
            "wall_s": wall, "test_auc": rec["test"]["test/auc"], "reports": len(h),
            "checkpoint_s": ckpt[len(ckpt) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--library", default="xgboost", choices=["xgboost", "lightgbm"])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="model.checkpoint_every_n_rounds (default: the model config's)")
    a = ap.parse_args()
    b = bare(a.library, a.rounds)
    f = framework(a.library, a.rounds, a.checkpoint_every)
    print(f"{a.library}, Adult, {a.rounds} rounds, 1 thread, steady state (rounds "
          f"{2 * PER_REPORT}..{a.rounds}):")
    print(f"  bare {a.library}.train()   {b['rounds_per_s']:8.1f} rounds/s   "
          f"(process part {b['wall_s']:.1f} s)")
    print(f"  jobs.train (Ray Train) {f['rounds_per_s']:8.1f} rounds/s   ratio "
          f"{f['rounds_per_s'] / b['rounds_per_s']:.2f}x   (wall {f['wall_s']:.1f} s incl. "
          f"Ray start, {f['reports']} reports, median report with a checkpoint "
          f"{f['checkpoint_s'] * 1000:.0f} ms; test AUC {f['test_auc']:.4f})")


if __name__ == "__main__":
    main()
