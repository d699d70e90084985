"""TPE+ASHA against random search without early stopping: same trial budget, several seeds.

    python bench/tune_efficiency.py                   # Adult, 12 trials, <= 8 epochs, seeds 0 1 2
    python bench/tune_efficiency.py --backends        # also: seed 0 with TorchTrainer trials

For each strategy and seed prints the best validation AUC, the epochs consumed and the wall time,
then the epochs TPE+ASHA needed to reach random search's final best (its curve of best-so-far
against epochs consumed) and the mean ratio. With --backends, the same TPE+ASHA study with each
trial a 1-worker TorchTrainer run, against plain Tune function trials (the default for 1 worker).
Writes tune_efficiency.png (best-so-far vs epochs, one line per strategy and seed).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def study(overrides: list[str], store: str, prepared) -> dict:
    from mlops_ray.config.compose import job
    from mlops_ray.config.tune import TuneJob
    from mlops_ray.tune.tuner import run_tuning
    return run_tuning(job("tune", TuneJob, ["+experiment=adult_mlp", "tracking=none",
                                            f"storage.uri={store}", "train.epochs=8",
                                            "tune.num_samples=12", "tune.include_defaults=false",
                                            *overrides]), prepared=prepared, log=lambda *_: None)


def epochs_to_reach(curve: list, target: float) -> int | None:
    return next((e for e, v in curve if v >= target - 1e-12), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backends", action="store_true")
    a = ap.parse_args()
    import ray

    from mlops_ray.config.compose import job
    from mlops_ray.config.train import TrainJob
    from mlops_ray.data import prepare
    from mlops_ray.tune.tuner import plot_curves
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    prepared = prepare(job("train", TrainJob, ["+experiment=adult_mlp"]).dataset, 0)
    rows, curves, reach = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            res = {}
            for name, ov in (("tpe+asha", ["search=tpe", "scheduler=asha"]),
                             ("random+fifo", ["search=random", "scheduler=fifo"])):
                s = study([*ov, f"search.seed={seed}"], f"{tmp}/{name}-{seed}", prepared)
                res[name] = s
                curves[f"{name} seed {seed}"] = s["curve"]
                rows.append((name, seed, s["best"]["value"], s["total_epochs"], s["wall_s"]))
                print(f"# {name} seed {seed}: best {s['best']['value']:.4f}, "
                      f"{s['total_epochs']} epochs, {s['wall_s']} s", flush=True)
            target = res["random+fifo"]["best"]["value"]
            need = epochs_to_reach(res["tpe+asha"]["curve"], target)
            reach.append((seed, need, res["random+fifo"]["total_epochs"]))
        backend_rows = []
        if a.backends:
            for backend in ("function", "train"):
                s = study(["search.seed=0", f"tune.trial_backend={backend}", "scheduler=fifo",
                           "tune.num_samples=6",
                           "tune.max_concurrent_trials=1" if backend == "train" else
                           "tune.max_concurrent_trials=2"], f"{tmp}/backend-{backend}", prepared)
                backend_rows.append((backend, s["wall_s"], s["best"]["value"], s["total_epochs"]))
                print(f"# backend {backend}: {s['wall_s']} s", flush=True)
    ray.shutdown()
    print(f"{'strategy':<12} {'seed':>4} {'best val/auc':>12} {'epochs':>7} {'wall s':>7}")
    for name, seed, best, epochs, wall in rows:
        print(f"{name:<12} {seed:>4} {best:>12.4f} {epochs:>7} {wall:>7.1f}")
    for name in ("tpe+asha", "random+fifo"):
        sel = [r for r in rows if r[0] == name]
        print(f"{name:<12} mean {statistics.mean(r[2] for r in sel):>12.4f} "
              f"{statistics.mean(r[3] for r in sel):>7.1f} {statistics.mean(r[4] for r in sel):>7.1f}")
    print("\nepochs TPE+ASHA needed to reach random search's final best:")
    for seed, need, rand_epochs in reach:
        txt = f"{need} of random's {rand_epochs} ({need / rand_epochs:.0%})" if need else \
            "not reached within its budget"
        print(f"  seed {seed}: {txt}")
    got = [n / r for _, n, r in reach if n]
    if got:
        print(f"  mean ratio over seeds that reached it: {statistics.mean(got):.0%} "
              f"({len(got)}/{len(reach)} seeds)")
    if backend_rows:
        print("\nTPE+FIFO seed 0, 6 trials, trial backend (function: 2 concurrent, train: 1):")
        for backend, wall, best, epochs in backend_rows:
            print(f"  {backend:<9} wall {wall:>6.1f} s  best {best:.4f}  epochs {epochs}")
        f, t = backend_rows[0][1], backend_rows[1][1]
        print(f"  train / function wall: {t / f:.2f}x")
    plot_curves(curves, "val/auc", str(REPO / "bench" / "tune_efficiency.png"))


if __name__ == "__main__":
    main()
