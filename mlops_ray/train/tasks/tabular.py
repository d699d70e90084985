"""The tabular task: an MLP on a prepared table (the default `jobs.train`), or boosted trees
(`model=xgboost|lightgbm`: the same data and loop config, trees.py's loop on Ray Train's
XGBoost / LightGBM trainer).

Driver side (`make`): the data is validated and prepared before Ray starts, its arrays go to
the object store once, and the run record gets the dataset summary and held-out test metrics of
the best checkpoint. Worker side (`train_loop_per_worker`): every rank takes its share of each
global batch from the same permutation; spot-safety (restore, checkpoints, drains) is
train/spot.py's.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.config.base import Strict
from mlops_ray.config.train import EarlyStopCfg, FairnessPenaltyCfg, TrainJob
from mlops_ray.evaluation.stats import weighted_auc
from mlops_ray.models.trees import Trees
from mlops_ray.tracking import Live
from mlops_ray.train import session as sessions
from mlops_ray.train.progress import tabular_line
from mlops_ray.train.spot import EarlyStopping, Spot, seed_for
from mlops_ray.train.tasks import Task, gate_metrics
from mlops_ray.utils import build


class TabularLoopCfg(Strict):
    """What every worker gets (a plain dict across Ray; validated again in the worker)."""
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    run_name: str
    seed: int
    epochs: int
    batch_size: int
    precision: str
    lr_schedule: str
    early_stopping: EarlyStopCfg | None
    fairness_penalty: FairnessPenaltyCfg
    torch_threads: int
    use_gpu: bool
    model: dict[str, Any]
    optim: dict[str, Any]
    every_n_epochs: int
    every_n_steps: int
    preemption_check_every_n_steps: int
    preemption_grace_s: float
    score_attribute: str | None
    feature_names: list[str]
    preprocessor: dict[str, Any]
    step_log: str | None = None  # test seams (train/spot.py, train/gate.py)
    step_gate: str | None = None
    data_ref: Any = None  # the arrays in Ray's object store (None: the session has them)
    tracking: dict[str, Any] | None = None  # W&B, logged live by rank 0 (+ dir, group)
    # tuning trials (tune.gate_aware): the gates estimated on the validation rows at these
    # epochs_done values and at the run's end (evaluation/feasibility.py's arguments)
    gate: dict[str, Any] | None = None
    gate_at: list[int] = []


def loop_config(job: TrainJob, feature_names: list[str], preprocessor: dict[str, Any],
                run_name: str, data_ref: Any = None) -> TabularLoopCfg:
    import os

    from mlops_ray.tracking import local_dir
    from mlops_ray.train.gate import from_env
    t, ck = job.train, job.checkpoint
    return TabularLoopCfg(
        run_name=run_name, seed=job.seed, epochs=t.epochs, batch_size=t.batch_size,
        precision=t.precision, lr_schedule=t.lr_schedule, early_stopping=t.early_stopping,
        fairness_penalty=t.fairness_penalty, torch_threads=job.torch_threads(),
        use_gpu=job.scaling.use_gpu, model=job.model.spec(), optim=job.optim.spec(),
        every_n_epochs=ck.every_n_epochs, every_n_steps=ck.every_n_steps,
        preemption_check_every_n_steps=ck.preemption_check_every_n_steps,
        preemption_grace_s=job.failure.preemption_grace_s,
        score_attribute=ck.checkpoint_score_attribute, feature_names=feature_names,
        preprocessor=preprocessor, step_log=os.environ.get("MLOPS_RAY_STEP_LOG"),
        step_gate=from_env(), data_ref=data_ref,
        tracking=None if job.tracking.backend == "none" else {
            **job.tracking.plain(), "dir": local_dir(job.storage.plain()), "group": None})


def arrays(prepared: Any, penalty_attr: str | None = None) -> dict[str, np.ndarray]:
    (xt, yt), (xv, yv) = prepared.xy("train"), prepared.xy("val")
    out = {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv}
    if penalty_attr:  # group codes of the training rows, for the fairness penalty only
        col = prepared.frame.iloc[prepared.splits["train"]][penalty_attr].astype(str)
        out["g_train"] = np.unique(col.to_numpy(), return_inverse=True)[1].astype(np.int64)
    return out


def _evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        logits = net(x).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        p, yy = torch.sigmoid(logits).cpu().numpy(), y.cpu().numpy()
    net.train()
    # the Mann-Whitney statistic (scikit-learn's roc_auc_score to rounding, without its import)
    auc = (float(weighted_auc(yy, p, np.ones((1, len(yy))))[0]) if len(np.unique(yy)) == 2
           else float("nan"))
    return {"val/loss": loss, "val/auc": auc, "val/accuracy": float(((p >= 0.5) == yy).mean())}


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


def train_loop_per_worker(config: dict[str, Any], session: Any = None) -> dict[str, Any]:
    """One rank of a run. `session`: where it runs (default: a Ray Train worker)."""
    t_entered = time.time()  # the worker group is up (the run record's startup phases)
    session = session or sessions.TrainSession()
    c = TabularLoopCfg.model_validate(config)
    rank, world = session.rank, session.world
    t_first_step: float | None = None
    torch.set_num_threads(c.torch_threads)
    device = session.device(c.use_gpu)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    amp = device.type == "cuda" and c.precision == "bf16"

    data = session.data(config)
    # copies: arrays from the object store are read-only views
    x_tr, y_tr = torch.tensor(data["x_train"]), torch.tensor(data["y_train"])
    x_val, y_val = torch.tensor(data["x_val"], device=device), torch.tensor(data["y_val"], device=device)
    penalty = c.fairness_penalty
    g_tr = torch.tensor(data["g_train"]) if penalty.kind != "none" and penalty.weight > 0 \
        else None
    seed, epochs = c.seed, c.epochs
    per_worker = c.batch_size // world
    steps_per_epoch = len(x_tr) // c.batch_size  # equal on every rank: report is a barrier
    es_cfg = c.early_stopping.model_dump() if c.early_stopping else None

    torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    # on its device before the optimizer exists, so restored optimizer state lands there too
    net = build(c.model, in_features=x_tr.shape[1]).to(device)
    opt = build(c.optim)(net.parameters())
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
             if c.lr_schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(
                 opt, lambda _: 1.0))
    # mid-epoch checkpoints only under Ray Train (a Tune trial reports once per epoch for its
    # scheduler); their score is NaN, which Ray ranks below every number: never "best"
    spot = Spot(session, c.run_name, every_n_epochs=c.every_n_epochs,
                every_steps=c.every_n_steps if session.kind == "train" else 0,
                preempt_every=c.preemption_check_every_n_steps, grace_s=c.preemption_grace_s,
                step_log=c.step_log, step_gate=c.step_gate)
    start_epoch, start_step, loss_sum, history, stopped = 0, 0, 0.0, [], False
    stopper = EarlyStopping(es_cfg)
    restored_from = None
    if (st := spot.restore()) is not None:
        net.load_state_dict(st["model"])
        stopped = bool(st.get("stopped"))
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, start_step, loss_sum = st["epoch"], st["step"], st["loss_sum"]
        history, stopper = st["history"], EarlyStopping(es_cfg, st["early_stop"])
        restored_from = {"epoch": start_epoch, "step": start_step, "jit": spot.jit_restore}
    model = session.prepare(net, device)
    bare = getattr(model, "module", model)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    # the dropout masks' generator alone: torch.manual_seed also seeds every other backend's
    # (CUDA, XPU, MTIA), ~90 us a step on a CPU, about 2% of an Adult step; same masks
    reseed = (torch.cuda.manual_seed if device.type == "cuda"
              else torch.default_generator.manual_seed)

    def report(metrics: dict[str, Any], epoch: int, step: int, keep: bool,
               jit: bool = False) -> None:
        def write(folder: str) -> None:
            state = {"model": bare.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "step": step,
                     "loss_sum": loss_sum, "history": history, "early_stop": stopper.state(),
                     "stopped": stop, **spot.bookkeeping(jit),
                     "rng": ckpt_io.rng_state()}
            meta = {"model": c.model, "in_features": int(x_tr.shape[1]),
                    "feature_names": c.feature_names, "run_name": c.run_name,
                    "epoch": epoch, "step": step, "metrics": metrics, "jit": jit}
            ckpt_io.save(folder, state, meta, c.preprocessor)
        spot.report(metrics, keep, f"checkpoint_e{epoch:04d}_s{step:05d}", write, epoch, step)
        if keep and rank == 0:
            session.publish({"checkpoint_seconds": spot.ckpt_s}, c.run_name)

    live = Live(c.tracking, c.run_name, rank, {"model": c.model, "optim": c.optim, "seed": seed,
                                               "batch_size": c.batch_size, "epochs": epochs})
    last: dict[str, Any] = history[-1] if history else {}
    stop = stopped  # a run that stopped early stays stopped when rerun
    session.publish({"preemptions_survived": spot.survived, "restarts": spot.restarts,
                     "epoch": start_epoch}, c.run_name)
    spot.log("start", start_epoch, start_step)
    for epoch in range(start_epoch, epochs if not stopped else start_epoch):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(
            seed_for(seed, epoch)))
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            loss_sum = 0.0
        for step in range(first, steps_per_epoch):
            lo = step * c.batch_size + rank * per_worker
            idx = order[lo:lo + per_worker]
            xb, yb = x_tr[idx].to(device, non_blocking=True), y_tr[idx].to(device, non_blocking=True)
            reseed(seed_for(seed, epoch, step, rank))  # dropout masks
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb).float()
                loss = loss_fn(logits, yb)
                if g_tr is not None:  # the in-training fairness penalty
                    loss = loss + penalty.weight * _fairness_penalty(
                        torch.sigmoid(logits), yb, g_tr[idx].to(device), penalty.kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            if t_first_step is None:
                t_first_step = time.time()
            spot.log("step", epoch, step + 1)
            if step + 1 == steps_per_epoch:
                break  # the epoch end below reports (and checks for a drain)
            due = spot.between_steps(epoch, step + 1, step + 1)
            if due == "jit":
                # just-in-time checkpoint at (epoch, step+1), once per drain; the drained node
                # dies after this. Metrics of these weights, so scoring stays honest.
                report({**last, **_evaluate(bare, x_val, y_val), "epoch": epoch,
                        "preempted": 1}, epoch, step + 1, True, jit=True)
                spot.hold()
            elif due == "ckpt":
                mid: dict[str, float] = {"epoch": epoch, "step": step + 1, "mid_epoch": 1}
                if c.score_attribute:
                    mid[c.score_attribute] = math.nan
                report(mid, epoch, step + 1, True)
        sched.step()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "epochs_done": epoch + 1, "world_size": world,
                   "restored_from_epoch": restored_from["epoch"] if restored_from else -1,
                   "train/loss": loss_sum / max(1, steps_per_epoch),
                   **_evaluate(bare, x_val, y_val), "lr": sched.get_last_lr()[0],
                   "time/epoch_s": seconds, "time/at": time.time(),
                   "time/checkpoint_s": spot.ckpt_s,
                   "time/samples_per_s": (steps_per_epoch - first) * c.batch_size / seconds}
        stop = stopper.update(metrics)
        metrics["early_stopped"] = int(stop)
        if c.gate and (stop or epoch + 1 in c.gate_at or epoch == epochs - 1):
            bare.eval()
            with torch.no_grad():
                p_val = torch.sigmoid(bare(x_val).float()).cpu().numpy()
            bare.train()
            metrics.update(gate_metrics(c.gate, data, p_val))
        history.append(metrics)
        last = metrics
        session.publish({"samples_per_second": metrics["time/samples_per_s"],
                         "epoch_seconds": seconds, "epoch": epoch + 1}, c.run_name)
        done = stop or epoch == epochs - 1
        # a just-in-time checkpoint when a drain was announced, else on the schedule
        keep, draining = spot.at_epoch_end(epoch + 1, done)
        loss_sum = 0.0
        report(metrics, epoch + 1, 0, keep, jit=draining)
        live.log(metrics, step=epoch)  # after the report: W&B shows what was checkpointed
        if draining and not done:
            spot.hold()
        if stop:
            break
    spot.close()
    live.finish()
    return {"history": history, "restored_from": restored_from, "stopped_early": stop,
            "preemptions_survived": spot.survived, "restarts": spot.restarts,
            "rank": rank, "world_size": world,
            "startup": {"t_entered": t_entered, "t_first_step": t_first_step}}


# ------------------------------------------------------------------------------- driver side
def importances(best: Any, top: int = 20) -> dict[str, float]:
    """A tree checkpoint's features by share of total gain (the top `top`)."""
    with best.as_directory() as d:
        model, _, meta = ckpt_io.load_model(d)
    if not isinstance(model, Trees):
        return {}
    imp = model.feature_importances(meta["feature_names"])
    return dict(sorted(imp.items(), key=lambda kv: -kv[1])[:top])


def test_metrics(best: Any, prepared: Any) -> dict[str, float]:
    """Held-out test metrics of a checkpoint (threshold 0.5; evaluation picks it on val)."""
    from mlops_ray.evaluation.metrics import binary_metrics
    with best.as_directory() as d:
        model, pre, _ = ckpt_io.load_model(d)
    rows = prepared.frame.iloc[prepared.splits["test"]]
    return binary_metrics(prepared.labels(rows), ckpt_io.predict_proba(model, pre.transform(rows)),
                          prefix="test/")


def summary_lines(record: dict[str, Any]) -> list[str]:
    best, test = record.get("best", {}), record.get("test", {})
    return [
        f"data       {record['dataset']['name']} version {record['dataset']['version']} "
        f"rows {record['dataset']['splits']}",
        f"best val   auc {best.get('val/auc', float('nan')):.4f} at "
        + (f"round {best['best_round']}" if "best_round" in best else f"epoch {best.get('epoch')}"),
        f"test       auc {test.get('test/auc', float('nan')):.4f}  accuracy "
        f"{test.get('test/accuracy', float('nan')):.4f}  log_loss "
        f"{test.get('test/log_loss', float('nan')):.4f}",
        f"checkpoint {record.get('checkpoints', {}).get('best')}",
    ]


def make(job: TrainJob, prepared: Any = None) -> Task:
    """The task of a tabular train job; `prepared`: its data when the caller has it already
    (validated before Ray starts either way)."""
    from mlops_ray.data import prepare
    prepared = prepared or prepare(job.dataset, job.seed, storage=job.storage)
    pre = prepared.preprocessor

    def loop_cfg(run_name: str) -> dict[str, Any]:
        import ray
        ref = ray.put(arrays(prepared, job.penalty_attribute()))
        return loop_config(job, pre.feature_names, pre.to_dict(), run_name, ref).plain()

    from mlops_ray.train.tasks import tabular_loop
    trees = job.is_trees()

    def finish(record: dict[str, Any], best: Any) -> None:
        record["test"] = test_metrics(best, prepared)
        if trees:
            record["feature_importance"] = importances(best)

    return Task(name="trees" if trees else "tabular", loop=tabular_loop, loop_config=loop_cfg,
                trainer=job.model.spec()["library"] if trees else "torch", best_is_latest=trees,
                # the boosting loop logs no W&B itself: the driver logs its history
                live_tracking=job.tracking.backend != "none" and not trees,
                data_version=prepared.version,
                dataset={"name": job.dataset.name, "uri": job.dataset.uri,
                         **prepared.summary()},
                progress=tabular_line, summary=summary_lines, finish=finish,
                finish_imports=("mlops_ray.evaluation.metrics",))
