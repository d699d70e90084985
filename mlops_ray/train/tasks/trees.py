"""Gradient-boosted trees (`model=xgboost`, `model=lightgbm`) on the tabular task's data.

The same prepared table, preprocessing and loop config as the MLP (tabular.py): every rank
boosts on its share of the training rows (rank::world) and sees the whole validation set, so
every rank computes the same validation metrics and takes the same early-stopping decision.
Under Ray Train the driver runs it on `XGBoostTrainer` / `LightGBMTrainer` (V2, a per-worker
train function), whose backends join the workers into one distributed booster (XGBoost's
collective, LightGBM's network parameters).

One boosting call with a callback: every `rounds_per_report` rounds it reports the validation
metrics (one "epoch" of the run record), every `checkpoint.every_n_epochs` reports a
checkpoint (the booster bytes, the round, early stopping); a restart continues the booster
from the last checkpoint, so finished rounds are never redone. At the end the model is cut at
its best round and reported once more: the run's best checkpoint is the early-stopped model.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.models.trees import Trees
from mlops_ray.train import session as sessions
from mlops_ray.train.spot import Spot
from mlops_ray.train.tasks import gate_metrics
from mlops_ray.train.tasks.tabular import TabularLoopCfg

METRICS = {"xgboost": {"auc": "auc", "logloss": "loss"},
           "lightgbm": {"auc": "auc", "binary_logloss": "loss"}}


def library_params(spec: dict[str, Any], seed: int, threads: int, use_gpu: bool
                   ) -> dict[str, Any]:
    """The model config's portable names -> the library's own parameters."""
    s = spec
    if s["library"] == "xgboost":
        return {"objective": "binary:logistic", "eval_metric": ["logloss", "auc"],
                "tree_method": "hist", "device": "cuda" if use_gpu else "cpu",
                "eta": s["learning_rate"], "max_depth": s["max_depth"],
                "min_child_weight": s["min_child_weight"], "subsample": s["subsample"],
                "colsample_bytree": s["colsample_bytree"], "lambda": s["reg_lambda"],
                "alpha": s["reg_alpha"], "max_bin": s["max_bin"], "nthread": threads,
                "seed": seed}
    return {"objective": "binary", "metric": ["binary_logloss", "auc"],
            "learning_rate": s["learning_rate"], "num_leaves": s["num_leaves"],
            "max_depth": s["max_depth"], "min_child_samples": s["min_child_samples"],
            "bagging_fraction": s["subsample"], "bagging_freq": 1 if s["subsample"] < 1 else 0,
            "feature_fraction": s["colsample_bytree"], "lambda_l2": s["reg_lambda"],
            "lambda_l1": s["reg_alpha"], "max_bin": s["max_bin"], "num_threads": threads,
            "seed": seed, "deterministic": True, "force_row_wise": True, "verbose": -1,
            **({"device_type": "cuda"} if use_gpu else {})}


class _Stop:
    """Early stopping by rounds, resumable: best value, its round, rounds since."""

    def __init__(self, cfg: dict[str, Any] | None, rounds: int, state: dict[str, Any] | None):
        self.cfg, self.rounds = cfg, rounds
        st = state or {}
        self.best, self.best_round = st.get("best"), st.get("best_round", 0)
        self.at_best: dict[str, float] = st.get("at_best", {})  # the metrics at best_round

    def update(self, values: dict[str, float], key: str, rnd: int) -> bool:
        sign = 1 if (self.cfg or {}).get("mode", "max") == "max" else -1
        if not self.cfg or self.best is None or \
                sign * (values[key] - self.best) > self.cfg["min_delta"]:
            self.best, self.best_round, self.at_best = values[key], rnd, dict(values)
        return bool(self.cfg) and rnd - self.best_round >= self.rounds

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "at_best": self.at_best}


def _cut(model: Trees, rounds: int) -> Trees:
    """The model's first `rounds` rounds, as a new model."""
    b = model.booster
    cut = (b[:rounds] if model.library == "xgboost"
           else type(b)(model_str=b.model_to_string(num_iteration=rounds)))
    return Trees(model.library, model.in_features, **model.params).set_booster(cut)


def train_loop_per_worker(config: dict[str, Any], session: Any = None) -> dict[str, Any]:
    """One rank of a boosting run (`session`: where it runs; default a Ray Train worker)."""
    session = session or sessions.TrainSession()
    c = TabularLoopCfg.model_validate(config)
    rank, world = session.rank, session.world
    spec = dict(c.model)
    lib, total = spec["library"], int(spec["num_boost_round"])
    per_report = int(spec["rounds_per_report"])
    data = session.data(config)
    x_tr = np.ascontiguousarray(data["x_train"][rank::world])
    y_tr = np.asarray(data["y_train"][rank::world])
    x_val, y_val = data["x_val"], data["y_val"]
    params = library_params(spec, c.seed, c.torch_threads, c.use_gpu)
    es_cfg: dict[str, Any] | None = (
        c.early_stopping.model_dump() if c.early_stopping else
        {"metric": "val/loss", "mode": "min", "min_delta": 0.0})
    if not spec.get("early_stopping_rounds"):
        es_cfg = None
    key = str((es_cfg or {}).get("metric", "val/auc"))

    # a checkpoint every checkpoint_every_n_rounds (a multiple of rounds_per_report)
    every = max(1, int(spec.get("checkpoint_every_n_rounds") or per_report) // per_report)
    spot = Spot(session, c.run_name, every_n_epochs=every, every_steps=0,
                preempt_every=c.preemption_check_every_n_steps, grace_s=c.preemption_grace_s,
                step_log=c.step_log, step_gate=c.step_gate)
    model = Trees(lib, x_tr.shape[1], **{k: v for k, v in spec.items()
                                         if k not in ("_target_", "library")})
    done, history, stopped, restored_from, st = 0, [], False, None, spot.restore()
    stopper = _Stop(es_cfg, int(spec.get("early_stopping_rounds") or 0), None)
    if st is not None:
        model.load_state_dict(st["model"])
        done, history, stopped = st["round"], st["history"], bool(st.get("stopped"))
        stopper = _Stop(es_cfg, int(spec.get("early_stopping_rounds") or 0), st["early_stop"])
        restored_from = {"epoch": st["epoch"], "round": done, "jit": spot.jit_restore}
    if lib == "lightgbm" and session.kind == "train" and world > 1:
        from ray.train.lightgbm import get_network_params  # set by LightGBMTrainer's backend
        params.update(tree_learner="data_parallel", pre_partition=True, **get_network_params())
    state = {"last": history[-1] if history else {}, "t0": time.perf_counter(), "round0": done}

    def report(metrics: dict[str, Any], m: Trees, rnd: int, keep: bool, jit: bool = False,
               final: bool = False) -> None:
        epoch = len(history)

        def write(folder: str) -> None:
            st_ = {"model": m.state_dict(), "round": rnd, "epoch": epoch, "history": history,
                   "early_stop": stopper.state(), "stopped": final, **spot.bookkeeping(jit),
                   "rng": ckpt_io.rng_state()}
            meta = {"model": c.model, "in_features": int(x_tr.shape[1]),
                    "feature_names": c.feature_names, "run_name": c.run_name, "epoch": epoch,
                    "round": rnd, "metrics": metrics, "jit": jit}
            ckpt_io.save(folder, st_, meta, c.preprocessor)
        spot.report(metrics, keep, f"checkpoint_r{rnd:06d}" + ("_best" if final else ""),
                    write, epoch, rnd)

    def after_round(booster: Any, values: dict[str, float]) -> bool:
        """After each round (every rank): early stopping, reports, drains. True: stop."""
        nonlocal done
        done += 1
        val = {"val/auc": values["auc"], "val/loss": values["loss"]}
        stop = stopper.update(val, key, done)
        end = stop or done >= total
        if done % per_report and not end:
            if spot.between_steps(len(history), done % per_report, done) == "jit":
                m = model.set_booster(booster)
                report({**state["last"], **val, "round": done, "preempted": 1}, m, done,
                       True, jit=True)
                spot.hold()
            return False
        seconds = time.perf_counter() - state["t0"]
        metrics = {"epoch": len(history), "epochs_done": len(history) + 1, "round": done,
                   "world_size": world, **val, "restored_from_epoch":
                   restored_from["epoch"] if restored_from else -1,
                   "time/epoch_s": seconds, "time/at": time.time(),
                   "time/checkpoint_s": spot.ckpt_s,
                   "time/rounds_per_s": (done - state["round0"]) / max(seconds, 1e-9),
                   "early_stopped": int(stop)}
        model.set_booster(booster)  # serialised only if this report keeps a checkpoint
        if c.gate and (end or len(history) + 1 in c.gate_at):
            metrics.update(gate_metrics(c.gate, data, _proba(model, x_val)))
        history.append(metrics)
        state["last"], state["t0"], state["round0"] = metrics, time.perf_counter(), done
        keep, draining = spot.at_epoch_end(len(history), False)
        report(metrics, model, done, keep or end, jit=draining)
        session.publish({"epoch": len(history)}, c.run_name)
        if draining and not end:
            spot.hold()
        return stop

    session.publish({"preemptions_survived": spot.survived, "restarts": spot.restarts,
                     "epoch": len(history)}, c.run_name)
    spot.log("start", len(history), done)
    t_fit = time.perf_counter()
    if not stopped and done < total:
        _boost(lib, params, x_tr, y_tr, x_val, y_val, total - done,
               model if st is not None else None, after_round)
    stopped = True
    best_round = max(stopper.best_round, 1)
    if st is None or not st.get("stopped"):
        # the early-stopped model: its first best_round rounds, with that round's metrics
        best = _cut(model, best_round)
        final = {**(history[-1] if history else {}), **stopper.at_best, "round": best_round,
                 "best_round": best_round, "epoch": len(history)}
        if c.gate:  # the constraints of the model the run keeps
            final.update(gate_metrics(c.gate, data, _proba(best, x_val)))
        report(final, best, best_round, True, final=True)
    spot.close()
    return {"history": history, "restored_from": restored_from,
            "stopped_early": bool(history and history[-1].get("early_stopped")),
            "preemptions_survived": spot.survived, "restarts": spot.restarts,
            "rank": rank, "world_size": world, "best_round": best_round,
            "boost_s": time.perf_counter() - t_fit}


def _proba(model: Trees, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-model.margins(x).astype(np.float64)))


def _boost(lib: str, params: dict[str, Any], x: np.ndarray, y: np.ndarray, xv: np.ndarray,
           yv: np.ndarray, rounds: int, init: Trees | None, after: Any) -> None:
    """`rounds` more rounds from `init` (None: from scratch), calling `after(booster,
    {"auc", "loss"})` after each; it returns True to stop."""
    names = METRICS[lib]
    if lib == "xgboost":
        import xgboost

        class Callback(xgboost.callback.TrainingCallback):
            def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
                v = {names[k]: float(s[-1]) for k, s in evals_log["val"].items() if k in names}
                return bool(after(model, v))

        dtrain = xgboost.DMatrix(x, label=y)
        dval = xgboost.DMatrix(xv, label=yv)
        xgboost.train(params, dtrain, num_boost_round=rounds, evals=[(dval, "val")],
                      verbose_eval=False, callbacks=[Callback()],
                      xgb_model=init.booster if init is not None else None)
        return
    import lightgbm
    from lightgbm.callback import EarlyStopException

    def callback(env: Any) -> None:
        v = {names[r[1]]: float(r[2]) for r in env.evaluation_result_list if r[1] in names}
        if after(env.model, v):
            raise EarlyStopException(env.iteration, env.evaluation_result_list)

    ltrain = lightgbm.Dataset(x, label=y, params={"max_bin": params["max_bin"]})
    lval = lightgbm.Dataset(xv, label=yv, reference=ltrain)
    lightgbm.train(params, ltrain, num_boost_round=rounds, valid_sets=[lval],
                   valid_names=["val"], callbacks=[callback],
                   init_model=init.booster if init is not None else None)
