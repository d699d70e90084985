"""Driver side of a language-model run (`task: lm`): the tabular run's machinery
(trainer.trainer_for: TorchTrainer, storage, failure and checkpoint config; run names; resume;
run.json; W&B) around the LM loop (lm_loop.py). No data preparation: the token stream is
synthetic and made on the workers.

run.json adds `summary`: the steady-state throughput of the run (the steps after
lm.warmup_steps: step ms, tokens/s over all workers, TFLOP/s and MFU per device, peak GPU
memory); `history` holds every report (one per lm.log_every_n_steps steps and epoch end).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from mlops_ray.cluster.cost import summary_line as cost_line
from mlops_ray.runtime import code_version, ensure_ray, library_versions
from mlops_ray.storage import from_cfg
from mlops_ray.train.gate import from_env as gate_from_env
from mlops_ray.train.trainer import (
    _best_checkpoint,
    checkpoint_uri,
    config_hash,
    fit,
    run_name_for,
    start_record,
    torch_threads,
    trainer_for,
)
from mlops_ray.utils import stable_hash


def data_version(cfg: dict[str, Any]) -> str:
    """The stream is a function of its config (and the seed, which the config hash holds)."""
    return stable_hash({"generator": "SyntheticTokens", **cfg["dataset"]})


def lm_loop_config(cfg: dict[str, Any], run_name: str) -> dict[str, Any]:
    """The plain dict each worker receives."""
    t, ck = cfg["train"], cfg["checkpoint"]
    return {
        "run_name": run_name, "seed": cfg["seed"], "epochs": t["epochs"],
        "batch_size": t["batch_size"], "precision": t["precision"],
        "lr_schedule": t["lr_schedule"], "early_stopping": t["early_stopping"],
        "torch_threads": torch_threads(cfg), "use_gpu": cfg["scaling"]["use_gpu"],
        "model": {k: v for k, v in cfg["model"].items() if v is not None},
        "optim": {**cfg["optim"], "_partial_": True}, "lm": cfg["lm"],
        "dataset": cfg["dataset"], "every_n_epochs": ck["every_n_epochs"],
        "every_n_steps": ck["every_n_steps"],
        "preemption_check_every_n_steps": ck["preemption_check_every_n_steps"],
        "preemption_grace_s": cfg["failure"]["preemption_grace_s"],
        "score_attribute": ck["checkpoint_score_attribute"],
        "step_gate": gate_from_env(),  # tests: hold the run at a step (train/gate.py)
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def progress_line(m: dict[str, Any], checkpoint: bool = False) -> str:
    line = (f"[mlops_ray] step {m['step']}: train/loss={m['train/loss']:.4f}"
            + (f" val/loss={m['val/loss']:.4f}" if "val/loss" in m else "")
            + f" {m['perf/tokens_per_s']:,.0f} tokens/s {m['perf/step_ms']:.1f} ms/step"
            + (f" MFU {100 * m['perf/mfu']:.1f}%" if m.get("perf/mfu") is not None else "")
            + (f" {m['perf/gpu_mem_gib']:.2f} GiB" if m.get("perf/gpu_mem_gib") is not None
               else ""))
    return line + (" [checkpoint]" if checkpoint else "")


def _progress_callback() -> Any:
    from ray.train import UserCallback

    class Progress(UserCallback):
        """One line per report in the driver's log (runs in the Train controller)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            if "perf/tokens_per_s" in metrics[0]:
                print(progress_line(metrics[0], checkpoint is not None), flush=True)

    return Progress()


def run_lm_training(cfg: dict[str, Any], *, log: Any = print) -> dict[str, Any]:
    """Train a language model from a validated LmTrainJobCfg (plain dict); returns the record."""
    from mlops_ray.train.lm_loop import lm_train_loop_per_worker
    t_start = time.perf_counter()
    storage = from_cfg(cfg["storage"])
    version = data_version(cfg)
    run_name = run_name_for(cfg, version)
    cluster = ensure_ray(cfg["ray"])
    record: dict[str, Any] = {
        "run_name": run_name, "name": cfg["name"], "task": "lm", "status": "running",
        "seed": cfg["seed"], "config": cfg, "config_hash": config_hash(cfg),
        "dataset": {**cfg["dataset"], "version": version},
        "code_version": code_version(), "versions": library_versions(),
        "run_uri": storage.uri_of("runs", run_name),
    }
    start_record(record, storage, run_name, cluster, log)
    trainer = trainer_for(cfg, lm_loop_config(cfg, run_name), run_name, storage, "runs",
                          [_progress_callback()], loop_fn=lm_train_loop_per_worker)
    result, node_hours = fit(trainer, cfg, record, storage, run_name)
    ret = result.return_value or {}
    history = ret.get("history", [])
    best_ckpt = _best_checkpoint(result, cfg)
    record.update(
        status="finished", history=history, summary=ret.get("summary"),
        restored_from=ret.get("restored_from"), stopped_early=ret.get("stopped_early"),
        world_size=ret.get("world_size"), restarts=ret.get("restarts", 0),
        preemptions_survived=ret.get("preemptions_survived", 0),
        cost=node_hours.report(cfg["cost"]), final=dict(history[-1]) if history else {},
        checkpoints={"latest": checkpoint_uri(storage, result.checkpoint.path),
                     "best": checkpoint_uri(storage, best_ckpt.path)},
    )
    best = next((m for c, m in (result.best_checkpoints or []) if c.path == best_ckpt.path),
                history[-1] if history else {})
    record["best"] = {k: v for k, v in best.items() if k != "checkpoint_dir_name"}
    record["wall_s"] = round(time.perf_counter() - t_start, 2)
    local_out = storage.path() if storage.is_local else os.path.abspath("outputs")
    try:
        from mlops_ray.tracking import log_run
        record["tracking_dir"] = log_run(record, cfg["tracking"], os.path.join(local_out, "wandb"),
                                         step_key="step")
    except Exception as e:  # noqa: BLE001 - tracking must never lose a finished run
        record["tracking_error"] = f"{type(e).__name__}: {e}"
        print(f"warning: tracking failed ({record['tracking_error']})", file=sys.stderr)
    storage.write_json(record, "runs", run_name, "run.json")
    return record


def summary_lines(record: dict[str, Any]) -> list[str]:
    s, h = record.get("summary") or {}, record.get("history") or []
    final, best = record.get("final") or {}, record.get("best") or {}
    cfg = record["config"]
    lines = [
        f"run        {record['run_name']} ({record['status']}"
        + (f", resumed from step {record['restored_from']['step']}"
           if record.get("restored_from") else "") + ")",
        f"model      {cfg['model']['size']}"
        + (f": {s['params'] / 1e6:.2f}M params, {s['flops_per_token'] / 1e9:.4g} GFLOP/token, "
           f"seq {s['seq_len']}" if s else "")
        + f"; {record.get('world_size')} worker(s), {cfg['lm']['strategy']}, "
        f"{cfg['train']['precision']}" + (f", compile:{cfg['lm']['compile_mode']}"
                                          if cfg["lm"]["compile"] else ", eager"),
        f"loss       train {_fmt(h[0]['train/loss'] if h else None, '.3f')} -> "
        f"{_fmt(final.get('train/loss'), '.3f')}, val {_fmt(final.get('val/loss'), '.3f')} "
        f"at step {final.get('step')}; best val/loss {_fmt(best.get('val/loss'), '.3f')}",
    ]
    if s:
        util = (f"MFU {s['mfu_pct']:.1f}% of {s['peak_tflops']:g}" if s.get("mfu_pct") is not None
                else "MFU - (no peak TFLOP/s known")
        lines.append(
            f"throughput {s['tokens_per_s']:,.0f} tokens/s, {s['step_ms']:.1f} ms/step over "
            f"{s['timed_steps']} steps after {s['warmup_steps']} warm-up; per device "
            f"{s['tflops']:.3g} TFLOP/s, {util} for {s['device']})"
            + (f", peak mem {s['peak_mem_gib']:.2f} GiB" if s.get("peak_mem_gib") is not None
               else ""))
    lines += [f"checkpoint {record.get('checkpoints', {}).get('latest')}",
              f"run record {record['run_uri']}/run.json"]
    if record.get("tracking_dir"):
        lines.append(f"W&B        {record['tracking_dir']} (offline: `wandb sync` it to upload)")
    if record.get("restarts"):
        lines.append(f"restarts   {record['restarts']}")
    if line := cost_line(record.get("cost")):
        lines.append(line)
    lines.append(f"wall time  {record.get('wall_s')} s")
    return lines
