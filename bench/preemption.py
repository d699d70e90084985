"""Recovery time, lost work and checkpoint overhead when a spot node goes, on a local cluster.

    python bench/preemption.py                      # intervals 1, 5, 20 steps and per epoch
    python bench/preemption.py --intervals 5 --epochs 3

A head and two spot worker nodes on this machine (mlops_ray.cluster.rehearsal.LocalCluster),
DDP over 2 workers (one per spot node) on Adult. For each checkpoint interval, two runs:
  notice     the fake AWS metadata announces an interruption, the spot watcher drains the node,
             the loop writes a just-in-time checkpoint and holds; the node is then taken away;
  no notice  the node is killed mid-interval without warning.
Measured from the per-step log the training loop writes (MLOPS_RAY_STEP_LOG):
  recovery   node loss (with a notice: the drain deadline, when Ray Train restarts the group)
             -> first optimizer step after the restart; the replacement node is added at once
  lost       steps completed before the loss that the restarted run had to redo
  overhead   checkpoint time / pure step time before the loss, in the same run (the baseline)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_ray.cluster.rehearsal import (  # noqa: E402
    Background,
    FakeMetadata,
    LocalCluster,
    checkpoints,
    read_step_log,
    wait_for,
)
from mlops_ray.config.compose import job  # noqa: E402
from mlops_ray.config.train import TrainJob  # noqa: E402
from mlops_ray.data import prepare  # noqa: E402
from mlops_ray.train.driver import run_training  # noqa: E402

NOTICE_S = 15  # AWS gives 120 s, GCP and Azure 30 s; shortened so the bench runs quickly


def one(cluster: LocalCluster, interval: int, notice: bool, epochs: int, root: Path) -> dict:
    out = root / f"k{interval}-{'notice' if notice else 'kill'}"
    log = out / "steps.log"
    out.mkdir(parents=True)
    cfg = job("train", TrainJob, [
        "+experiment=adult_mlp", f"train.epochs={epochs}", "train.early_stopping=null",
        "tracking=none", "scaling.num_workers=2", "+scaling.resources_per_worker.spot=1",
        "scaling.resources_per_worker.CPU=0.5", "failure.max_failures=2",
        f"checkpoint.every_n_steps={interval}", "checkpoint.num_to_keep=2",
        f"checkpoint.preemption_check_every_n_steps={1 if notice else 0}",
        f"storage.uri={out}", f"ray.address={cluster.address}"])
    prepared = prepare(cfg.dataset, cfg.seed)
    spe = len(prepared.splits["train"]) // cfg.train.batch_size
    run_dir = out / "runs" / cfg.run_name(prepared.version)
    os.environ["MLOPS_RAY_STEP_LOG"] = str(log)
    run = Background(lambda: run_training(cfg, prepared=prepared, log=lambda _: None))
    # the fault comes mid-interval in the second epoch
    k = interval or spe
    target = spe + (k // 2 if k > 1 else 1) + (spe // 3 // k) * k
    wait_for(lambda: log.exists() and any(ev == "step" and e * spe + s >= target
                                          for _, ev, e, s, _ in read_step_log(log)),
             600, "the fault point", abort=run.done)
    node = cluster.workers[-1]
    if notice:
        from mlops_ray.cluster.spot_watcher import watch
        meta = FakeMetadata()
        threading.Thread(target=watch, args=("aws", meta.url, cluster.address, node.node_id,
                                             0.2, 3000), daemon=True).start()
        meta.notify(NOTICE_S)
        noticed = time.time()
        lost_at = noticed + NOTICE_S  # Ray Train restarts the group at the drain deadline

        def jit() -> bool:
            return any(json.loads((run_dir / n / "meta.json").read_text()).get("jit")
                       for n in checkpoints(run_dir))
        wait_for(jit, 120, "the just-in-time checkpoint", abort=run.done)
        jit_s = time.time() - noticed
        meta.close()
        cluster.add()  # the replacement, while the drained node sees out its notice

        def restarted() -> bool:
            return sum(ev == "start" for _, ev, *_ in read_step_log(log)) >= 2
        wait_for(restarted, 120, "the restart at the deadline", abort=run.done)
        cluster.kill(node)  # the cloud takes the node
    else:
        lost_at = time.time()  # the node starts dying now: work after this is lost
        cluster.kill(node)
        cluster.add()
    rec = run.result(900)
    os.environ.pop("MLOPS_RAY_STEP_LOG")
    events = read_step_log(log)
    restart = [t for t, ev, *_ in events if ev == "start"][1]
    # steps completed before the loss (a notice: before the restart; no notice: before the
    # kill was issued, though the dying node's peers may finish a step or two meanwhile)
    before = [(t, ev, e * spe + s, x) for t, ev, e, s, x in events
              if t < (restart if notice else lost_at)]
    after = [t for t, ev, *_ in events if t > restart and ev == "step"]
    done_before = max(g for _, ev, g, _ in before if ev == "step")
    restored = rec["restored_from"]["epoch"] * spe + rec["restored_from"]["step"]
    steps = [t for t, ev, _, _ in before if ev == "step"]
    ckpt_s = sum(float(x) for _, ev, _, x in before if ev == "ckpt")
    wall = steps[-1] - steps[0]
    return {"interval": interval or f"epoch ({spe})", "notice": notice,
            "recovery_s": round(after[0] - lost_at, 1), "lost_steps": done_before - restored,
            "overhead_pct": round(100 * ckpt_s / max(1e-9, wall - ckpt_s), 1),
            "jit_after_notice_s": round(jit_s, 1) if notice else None,
            "restarts": rec["restarts"], "finished": rec["status"] == "finished"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 5, 20, 0],
                    help="checkpoint every N steps (0: once per epoch, the default)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["notice", "kill"],
                    choices=["notice", "kill"], help="with a preemption notice, and/or without")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(workers=2) as cluster:
        for k in args.intervals:
            for notice in [m == "notice" for m in args.modes]:
                rows.append(one(cluster, k, notice, args.epochs, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'interval':>14} {'notice':>7} {'recovery s':>11} {'lost steps':>11} "
          f"{'ckpt overhead':>14}")
    for r in rows:
        print(f"{r['interval']!s:>14} {'yes' if r['notice'] else 'no':>7} {r['recovery_s']:>11} "
              f"{r['lost_steps']:>11} {r['overhead_pct']:>13}%")
    print("goal: recovery <= 20 s; lost 0 with a notice, <= one interval without; "
          "overhead <= 5% at the default interval (once per epoch)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
