"""The per-worker training loop (runs inside Ray Train workers).

Spot-safe by construction:
* restores from `ray.train.get_checkpoint()` first (a retry, or a rerun of the same run name);
* shuffling and dropout are reseeded from (seed, epoch, step, rank), so a resumed run replays
  exactly the batches and masks an uninterrupted one would: equal final weights on CPU;
* reports metrics every epoch and a checkpoint every `every_n_epochs` (and, for long epochs,
  every `every_n_steps` optimizer steps), and a just-in-time checkpoint as soon as
  `ray.train.get_preemption_info()` says a node is draining; then it holds still until Ray Train
  tears the group down at the drain deadline, so no completed step is redone after the restart.

With MLOPS_RAY_STEP_LOG=<path> in the driver's environment rank 0 appends one line per step and per checkpoint
("<unix time> step|ckpt|start <epoch> <step> [seconds]") for `bench/preemption.py`.
"""
from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mlops_ray.train import checkpoint as ckpt_io
from mlops_ray.train.gate import StepGate
from mlops_ray.utils import build

_MIX = (1_000_003, 10_007, 101)
_METRICS = {  # what each published gauge means (Ray exports them as ray_mlops_train_<name>)
    "samples_per_second": "training samples per second in the last epoch",
    "epoch_seconds": "wall time of the last epoch",
    "checkpoint_seconds": "wall time of the last checkpoint save and upload",
    "epoch": "epochs completed",
    "preemptions_survived": "restarts from a just-in-time (preemption) checkpoint",
    "restarts": "restarts of the worker group (failures and preemptions)",
}


def _seed_for(seed: int, epoch: int, step: int = 0, rank: int = 0) -> int:
    return (seed * _MIX[0] + epoch * _MIX[1] + step * _MIX[2] + rank) % (2**63 - 1)


class EarlyStopping:
    def __init__(self, cfg: dict[str, Any] | None, state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.best, self.bad = (state or {}).get("best"), (state or {}).get("bad", 0)

    def update(self, metrics: dict[str, float]) -> bool:
        """Record this epoch; True when training should stop."""
        if not self.cfg:
            return False
        v, sign = metrics[self.cfg["metric"]], 1 if self.cfg["mode"] == "max" else -1
        if self.best is None or sign * (v - self.best) > self.cfg["min_delta"]:
            self.best, self.bad = v, 0
        else:
            self.bad += 1
        return self.bad >= self.cfg["patience"]

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}


def _evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        logits = net(x).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        p, yy = torch.sigmoid(logits).cpu().numpy(), y.cpu().numpy()
    net.train()
    auc = float(roc_auc_score(yy, p)) if len(np.unique(yy)) == 2 else float("nan")
    return {"val/loss": loss, "val/auc": auc, "val/accuracy": float(((p >= 0.5) == yy).mean())}


class _TrainSession:
    """Ray Train worker API (inside a TorchTrainer)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch
        self.train, self.rt = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        return self.rt.get_device() if use_gpu else torch.device("cpu")

    def prepare(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return self.rt.prepare_model(net) if self.world > 1 or device.type == "cuda" else net

    def get_checkpoint(self) -> Any:
        return self.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None,
               name: str | None = None) -> None:
        ckpt = self.train.Checkpoint.from_directory(directory) if directory else None
        self.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def preempted(self) -> bool:  # a barrier: every rank calls it at the same points
        self.info = self.train.get_preemption_info()
        return self.info is not None

    def hold(self, grace_s: float) -> None:
        """After a just-in-time checkpoint: wait for Ray Train to tear this group down at the
        drain deadline instead of training steps that the restart would redo. Ray Train
        restarts at the deadline (+ grace) even when the node stays; should that restart not
        come within 2 minutes (a controller that is gone), training goes on."""
        until = self.info.deadline_ms / 1000 + grace_s + 120 if self.info else time.time()
        while time.time() < until:
            time.sleep(0.2)

    def publish(self, values: dict[str, float], run: str) -> None:
        """Gauges on the Ray dashboard / Prometheus (rank 0 only): `ray_mlops_train_*`."""
        if self.rank != 0:
            return
        if not hasattr(self, "_gauges"):
            from ray.util.metrics import Gauge
            self._gauges: dict[str, Any] = {}
            self._Gauge = Gauge
        for name, v in values.items():
            if name not in self._gauges:
                self._gauges[name] = self._Gauge(f"mlops_train_{name}", tag_keys=("run",),
                                                 description=_METRICS[name])
            self._gauges[name].set(float(v), tags={"run": run})


class _TuneSession(_TrainSession):
    """The same loop run directly as a Tune function trial (1 worker, no Train start-up)."""

    def __init__(self) -> None:
        import ray.tune
        self.tune, self.rank, self.world = ray.tune, 0, 1

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def prepare(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return net.to(device)

    def get_checkpoint(self) -> Any:
        return self.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None,
               name: str | None = None) -> None:
        ckpt = self.tune.Checkpoint.from_directory(directory) if directory else None
        self.tune.report(metrics, checkpoint=ckpt)

    def preempted(self) -> bool:
        return False  # a drained node kills the trial actor; Tune retries it from its checkpoint

    def publish(self, values: dict[str, float], run: str) -> None:
        pass


class _LocalSession(_TuneSession):
    """No Ray session: a plain call (a CV fold in a Ray task, a test). Keeps the last
    checkpoint directory in `config["local_dir"]`."""

    def __init__(self, local_dir: str | None) -> None:
        self.rank, self.world, self.local_dir = 0, 1, local_dir

    def get_checkpoint(self) -> Any:
        return None

    def report(self, metrics: dict[str, Any], directory: str | None = None,
               name: str | None = None) -> None:
        if directory and self.local_dir:
            import shutil
            shutil.copytree(directory, self.local_dir, dirs_exist_ok=True)


def _fairness_penalty(p: torch.Tensor, y: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """Squared gaps of mean predicted probability between groups in the batch: across all rows
    (demographic parity) or within each label (equalized odds)."""
    def gaps(mask: torch.Tensor) -> torch.Tensor:
        pm, gm = p[mask], g[mask]
        if pm.numel() == 0:
            return p.new_zeros(())
        overall = pm.mean()
        terms = [(pm[gm == k].mean() - overall) ** 2 for k in torch.unique(gm)]
        return torch.stack(terms).sum()
    if kind == "dp":
        return gaps(torch.ones_like(y, dtype=torch.bool))
    return gaps(y > 0.5) + gaps(y <= 0.5)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray

    kind = config.get("session")
    session = (_TuneSession() if kind == "tune" else _LocalSession(config.get("local_dir"))
               if kind == "local" else _TrainSession())
    rank, world = session.rank, session.world
    torch.set_num_threads(config["torch_threads"])
    device = session.device(config["use_gpu"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    amp = device.type == "cuda" and config["precision"] == "bf16"

    data = config["data"] if kind == "local" else ray.get(config["data_ref"])
    # copies: arrays from the object store are read-only views
    x_tr, y_tr = torch.tensor(data["x_train"]), torch.tensor(data["y_train"])
    x_val, y_val = torch.tensor(data["x_val"], device=device), torch.tensor(data["y_val"], device=device)
    penalty = config.get("fairness_penalty") or {}
    use_penalty = penalty.get("kind", "none") != "none" and penalty.get("weight", 0) > 0
    g_tr = torch.tensor(data["g_train"]) if use_penalty else None
    seed, epochs = config["seed"], config["epochs"]
    per_worker = config["batch_size"] // world
    steps_per_epoch = len(x_tr) // config["batch_size"]  # equal on every rank: report is a barrier

    torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    # on its device before the optimizer exists, so restored optimizer state lands there too
    net = build(config["model"], in_features=x_tr.shape[1]).to(device)
    opt = build(config["optim"])(net.parameters())
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
             if config["lr_schedule"] == "cosine" else torch.optim.lr_scheduler.LambdaLR(
                 opt, lambda _: 1.0))
    start_epoch, start_step, loss_sum, history, stopped = 0, 0, 0.0, [], False
    stopper = EarlyStopping(config["early_stopping"])
    restored_from, survived, restarts = None, 0, 0
    if (ckpt := session.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            st = ckpt_io.load_state(d)
        net.load_state_dict(st["model"])
        stopped = bool(st.get("stopped"))
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, start_step, loss_sum = st["epoch"], st["step"], st["loss_sum"]
        history, stopper = st["history"], EarlyStopping(config["early_stopping"], st["early_stop"])
        survived, restarts = st.get("preemptions_survived", 0), st.get("restarts", 0) + 1
        survived += bool(st.get("jit"))
        restored_from = {"epoch": start_epoch, "step": start_step, "jit": bool(st.get("jit"))}
    model = session.prepare(net, device)
    bare = getattr(model, "module", model)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    preempt_every = config["preemption_check_every_n_steps"]
    # mid-epoch checkpoints only under Ray Train (a Tune trial reports once per epoch for its
    # scheduler); their score is NaN, which Ray ranks below every number: never "best"
    every_steps = config.get("every_n_steps", 0) if kind not in ("tune", "local") else 0
    score_attr = config.get("score_attribute")
    step_log = open(config["step_log"], "a", buffering=1) \
        if rank == 0 and config.get("step_log") else None
    ckpt_s = 0.0

    def log_step(event: str, epoch: int, step: int, extra: str = "") -> None:
        if step_log:
            step_log.write(f"{time.time():.3f} {event} {epoch} {step} {extra}\n")

    def save_and_report(metrics: dict[str, Any], epoch: int, step: int, keep: bool,
                        jit: bool = False) -> None:
        """All ranks call this (a barrier); rank 0 attaches the checkpoint when `keep`."""
        nonlocal ckpt_s
        if not keep or rank != 0:
            session.report(metrics)
            return
        t = time.perf_counter()
        state = {"model": bare.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "epoch": epoch, "step": step,
                 "loss_sum": loss_sum, "history": history, "early_stop": stopper.state(),
                 "stopped": stop, "jit": jit, "preemptions_survived": survived,
                 "restarts": restarts,
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
        meta = {"model": config["model"], "in_features": int(x_tr.shape[1]),
                "feature_names": config["feature_names"], "run_name": config["run_name"],
                "epoch": epoch, "step": step, "metrics": metrics, "jit": jit}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_io.save(tmp, state, meta, config["preprocessor"])
            session.report(metrics, tmp, f"checkpoint_e{epoch:04d}_s{step:05d}")
        ckpt_s = time.perf_counter() - t
        log_step("ckpt", epoch, step, f"{ckpt_s:.4f}")
        session.publish({"checkpoint_seconds": ckpt_s}, config["run_name"])

    preempted = session.preempted
    gate = StepGate(config.get("step_gate"), config["run_name"], rank, world)

    last: dict[str, Any] = history[-1] if history else {}
    stop, drained = stopped, False  # a run that stopped early stays stopped when rerun
    session.publish({"preemptions_survived": survived, "restarts": restarts,
                     "epoch": start_epoch}, config["run_name"])
    log_step("start", start_epoch, start_step)
    for epoch in range(start_epoch, epochs if not stopped else start_epoch):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(
            _seed_for(seed, epoch)))
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            loss_sum = 0.0
        for step in range(first, steps_per_epoch):
            lo = step * config["batch_size"] + rank * per_worker
            idx = order[lo:lo + per_worker]
            xb, yb = x_tr[idx].to(device, non_blocking=True), y_tr[idx].to(device, non_blocking=True)
            torch.manual_seed(_seed_for(seed, epoch, step, rank))  # dropout masks
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb).float()
                loss = loss_fn(logits, yb)
                if g_tr is not None:  # use_penalty
                    loss = loss + penalty["weight"] * _fairness_penalty(
                        torch.sigmoid(logits), yb, g_tr[idx].to(device), penalty["kind"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            log_step("step", epoch, step + 1)
            if step + 1 == steps_per_epoch:
                break  # the epoch end below reports (and checks for a drain)
            held_into_drain = gate.hold(epoch, step + 1, preempted)  # a test seam: gate.py
            if not drained and (held_into_drain or preempt_every
                                and (step + 1) % preempt_every == 0 and preempted()):
                # just-in-time checkpoint at (epoch, step+1), once per drain; the drained node
                # dies after this. Metrics of these weights, so scoring stays honest.
                drained = True
                save_and_report({**last, **_evaluate(bare, x_val, y_val), "epoch": epoch,
                                 "preempted": 1}, epoch, step + 1, True, jit=True)
                session.hold(config.get("preemption_grace_s", 0.0))
            elif every_steps and (step + 1) % every_steps == 0:
                mid: dict[str, float] = {"epoch": epoch, "step": step + 1, "mid_epoch": 1}
                if score_attr:
                    mid[score_attr] = math.nan
                save_and_report(mid, epoch, step + 1, True)
        sched.step()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "epochs_done": epoch + 1, "world_size": world,
                   "restored_from_epoch": restored_from["epoch"] if restored_from else -1,
                   "train/loss": loss_sum / max(1, steps_per_epoch),
                   **_evaluate(bare, x_val, y_val), "lr": sched.get_last_lr()[0],
                   "time/epoch_s": seconds, "time/at": time.time(),
                   "time/checkpoint_s": ckpt_s,
                   "time/samples_per_s": (steps_per_epoch - first) * config["batch_size"] / seconds}
        stop = stopper.update(metrics)
        metrics["early_stopped"] = int(stop)
        history.append(metrics)
        last = metrics
        session.publish({"samples_per_second": metrics["time/samples_per_s"],
                         "epoch_seconds": seconds, "epoch": epoch + 1}, config["run_name"])
        done = stop or epoch == epochs - 1
        # a just-in-time checkpoint when a drain was announced, else on the schedule
        draining = preempted() and not drained  # a barrier: every rank calls it here
        keep = done or (epoch + 1) % config["every_n_epochs"] == 0 or draining
        loss_sum = 0.0
        save_and_report(metrics, epoch + 1, 0, keep, jit=draining)
        if draining and not done:
            drained = True
            session.hold(config.get("preemption_grace_s", 0.0))
        if stop:
            break
    if step_log:
        step_log.close()
    return {"history": history, "restored_from": restored_from, "stopped_early": stop,
            "preemptions_survived": survived, "restarts": restarts,
            "rank": rank, "world_size": world}
