"""Training overhead of jobs.train (Ray Train V2) against a bare PyTorch loop, in one run.

    python bench/train_overhead.py            # Adult, MLP 256-256, batch 512, 10 epochs, 1 thread

Prints, for (a) the bare loop, (b) `python -m jobs.train` on its own local Ray and (c) the same
attached to an already running `ray start --head`: steady-state samples/s (epochs 2..N, counted
between consecutive reports, so reporting and per-epoch checkpointing are included), the ratio
to (a), whole-process wall time and its ratio to (a)'s process.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t, out


def ray_steady(store: str, batch: int) -> float:
    (rec,) = [json.loads(p.read_text()) for p in Path(store).glob("runs/*/run.json")]
    at = [m["time/at"] for m in rec["history"]]
    steps = rec["dataset"]["splits"]["train"] // batch
    return steps * batch * (len(at) - 2) / (at[-1] - at[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batch = 512
    if a.bare_only:
        print(json.dumps(bare(a.epochs, batch)))
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    job = [sys.executable, "-m", "jobs.train", "+experiment=adult_mlp", "tracking=none",
           "train.early_stopping=null", f"train.epochs={a.epochs}", "train.torch_threads=1"]
    rows = []
    wall, out = timed([sys.executable, __file__, "--bare-only", f"--epochs={a.epochs}"], env)
    rows.append(("(a) bare PyTorch", json.loads(out.stdout)["samples_per_s"], wall))
    with tempfile.TemporaryDirectory() as d:
        wall, _ = timed([*job, f"storage.uri={d}"], env)
        rows.append(("(b) jobs.train, own local Ray", ray_steady(d, batch), wall))
    # (c) attached to a running head that this script starts and stops by its pid
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             "--block"], env={**env, **auth,
                                              "PATH": f"{Path(sys.executable).parent}:"
                                                      f"{os.environ['PATH']}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with tempfile.TemporaryDirectory() as d:
            wall, _ = timed([*job, f"storage.uri={d}", f"ray.address=127.0.0.1:{port}"],
                            {**env, **auth})
            rows.append(("(c) jobs.train, attached, first run", ray_steady(d, batch), wall))
            with tempfile.TemporaryDirectory() as d2:  # second run: the head is warm
                wall, _ = timed([*job, f"storage.uri={d2}", f"ray.address=127.0.0.1:{port}"],
                                {**env, **auth})
                rows.append(("(d) jobs.train, attached, second run", ray_steady(d2, batch),
                             wall))
    finally:
        head.terminate()
        head.wait(60)
    base_sps, base_wall = rows[0][1], rows[0][2]
    print(f"{'variant':<40} {'samples/s':>10} {'ratio':>6} {'wall s':>7} {'wall ratio':>10}")
    for name, sps, wall in rows:
        print(f"{name:<40} {sps:>10,.0f} {sps / base_sps:>6.2f} {wall:>7.1f} "
              f"{wall / base_wall:>10.2f}")


if __name__ == "__main__":
    main()
