"""Ray Tune + Optuna on the shared local cluster: ASHA, summary, retraining the best config,
resume after a killed driver and a killed trial worker (multi-worker trials, each a TorchTrainer:
tests/integration/test_pipeline.py's tuning)."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.train import TrainJob
from mlops_ray.config.tune import TuneJob
from mlops_ray.data import dataset_version, load_table
from mlops_ray.tune.tuner import run_tuning, study_name, with_tuned_params
from tests.conftest import REPO, job_env, wait_until, wandb_group, wandb_history

pytestmark = pytest.mark.ray

GERMAN = ["+experiment=german_mlp", "tracking=none", "train.epochs=6"]
GERMAN_VERSION = dataset_version(load_table("builtin://german"))


def tune_cfg(*overrides: str) -> dict:
    return validate(compose("tune", list(overrides)), TuneJob)


def test_tpe_asha_summary_best_run_and_retrain(ray_2_cpus, tmp_path):
    # one trial at a time: ASHA's decisions then depend on the values alone, not on which of
    # two concurrent trials reaches a rung first
    with_wandb = [a for a in GERMAN if a != "tracking=none"] + ["tracking=wandb"]
    job = tune_cfg(*with_wandb, f"storage.uri={tmp_path}", "tune.num_samples=6",
                   "tune.max_concurrent_trials=1")
    s = run_tuning(job)
    on_disk = json.loads((tmp_path / "tune" / s["study"] / "tune.json").read_text())
    assert on_disk["n_trials"] == 6 and len({t["trial_id"] for t in on_disk["trials"]}) == 6
    assert any(t["status"] == "EARLY_STOPPED" and t["epochs"] < 6 for t in on_disk["trials"]), \
        "ASHA stopped no trial early"
    assert on_disk["total_epochs"] < 6 * 6
    # each trial is its own W&B run, grouped by the study, with a row per epoch it trained
    for t in on_disk["trials"]:
        (run_file,) = (tmp_path / "wandb").glob(f"wandb/offline-run-*-trial-{t['trial_id']}/*.wandb")
        assert wandb_group(run_file) == s["study"]
        assert [r["epoch"] for r in wandb_history(run_file)] == list(range(t["epochs"]))
    assert (tmp_path / "tune" / s["study"] / "tune_curve.png").stat().st_size > 1000
    best = on_disk["best"]
    # gate-aware (the default): the best feasible trial, or the best of all when none is
    pool = [t for t in on_disk["trials"] if t["feasible"]] or on_disk["trials"]
    assert best["value"] == max(t["final_value"] for t in pool if t["final_value"] is not None)
    assert on_disk["gates"]["aware"] and on_disk["gates"]["estimated"] == 6
    rec = json.loads((tmp_path / "runs" / f"{s['study']}-best" / "run.json").read_text())
    assert rec["tune"]["trial_id"] == best["trial_id"] and rec["test"]["test/auc"] > 0.5
    assert rec["dataset"]["version"] and rec["config_hash"]
    # the Optuna study is in the database, with every trial told
    db = sqlite3.connect(tmp_path / "mlops_ray.db")
    n = db.execute("select count(*) from trials t join studies s using(study_id) "
                   "where s.study_name=? and t.state='COMPLETE'", (s["study"],)).fetchone()[0]
    assert n == 6
    # the study's own gauges reach Ray's Prometheus endpoint (what the dashboard charts)
    def terminated() -> float | None:
        text = _scrape(f'study="{s["study"]}"') or ""
        done = [x for x in text.splitlines() if x.startswith("ray_mlops_tune_trials{")
                and f'study="{s["study"]}"' in x and 'state="TERMINATED"' in x]
        return float(done[0].rsplit(" ", 1)[1]) if done else None
    wait_until(lambda: terminated() == 6, 90, interval=2,
               what="ray_mlops_tune_trials{state=TERMINATED} = 6 on the metrics endpoint")
    # `jobs.train from_tune=...` takes the best parameters (its training is any other run's)
    train = validate(compose("train", [*GERMAN, f"storage.uri={tmp_path}", "train.epochs=2",
                                       f"from_tune={s['tune_uri']}"]), TrainJob)
    tuned = with_tuned_params(train)
    changed = False
    for key, value in best["params"].items():
        section, name = key.split(".")
        changed |= getattr(getattr(train, section), name) != value
        assert getattr(getattr(tuned, section), name) == value
    # a best trial other than the experiment's own config is another run (gate-aware, the
    # defaults' trial may well be the best feasible one)
    assert (tuned.config_hash() != train.config_hash()) == changed


def test_gate_aware_study_returns_the_best_trial_the_gates_would_pass(ray_2_cpus, tmp_path):
    """A known case: a gate caps validation AUC at 0.915, so the high-learning-rate trials (the
    better AUC) are infeasible and the slow one is the best the gates would pass. Every trial's
    constraint reaches the Optuna study (set_constraint), tune.json says which trials are
    feasible and why not, and the Pareto plot is drawn."""
    import optuna

    from mlops_ray.config.evaluate import GateRule, GatesCfg
    from mlops_ray.config.tune import ParamSpec
    job = tune_cfg("+experiment=adult_xgboost", "tracking=none", f"storage.uri={tmp_path}",
                   "scheduler=fifo", "search=random", "tune.num_samples=4",
                   "tune.max_concurrent_trials=1", "model.num_boost_round=60",
                   "model.rounds_per_report=20", "model.learning_rate=0.3")
    cap = GateRule(name="cap", metric="test/auc", op="<=", threshold=0.915)
    fair = GateRule(name="eo_sex", metric="fair/eo_diff_sex", op="<=", threshold=0.5,
                    compare="ci_high")
    job = job.model_copy(update={
        "gates": GatesCfg(rules=[cap, fair]),
        "space": {"model.learning_rate": ParamSpec(type="categorical", choices=[0.3, 0.003])}})
    s = run_tuning(job)
    trials = s["trials"]
    lr = {t["trial_id"]: t["params"]["model.learning_rate"] for t in trials}
    assert set(lr.values()) == {0.3, 0.003}, "the known case needs both kinds of trial"
    for t in trials:
        assert set(t["constraints"]) == {"cap", "eo_sex"}
        assert t["feasible"] == (lr[t["trial_id"]] == 0.003)
        assert t["binding"] == (None if t["feasible"] else "cap")
    best = s["best"]
    assert best["feasible"] and lr[best["trial_id"]] == 0.003
    # without the constraint the study's best would have been an infeasible trial
    assert max(t["final_value"] for t in trials) > best["value"]
    assert s["gates"]["feasible"] == sum(v == 0.003 for v in lr.values())
    assert s["gates"]["best_is_feasible"] is True
    assert (tmp_path / "tune" / s["study"] / "tune_pareto.png").stat().st_size > 1000
    study = optuna.load_study(study_name=s["study"], storage=f"sqlite:///{tmp_path}/mlops_ray.db")
    assert sorted(bool(t.constraints["cap"] <= 0) for t in study.trials) == \
        sorted(bool(t["feasible"]) for t in trials)
    from mlops_ray.tune.tuner import summary_lines
    text = "\n".join(summary_lines(s))
    assert "infeasible (cap)" in text and "trials estimated feasible" in text


def _scrape(needle: str) -> str | None:
    import os

    import requests
    text = requests.get(f"http://127.0.0.1:{os.environ['MLOPS_TEST_RAY_METRICS_PORT']}/metrics",
                        timeout=10).text
    return text if needle in text and "ray_mlops_tune_best{" in text else None


def _complete_params(db_path: Path, study: str) -> list[str]:
    if not db_path.exists():
        return []
    try:
        with sqlite3.connect(db_path) as db:
            rows = db.execute(
                "select t.trial_id, p.param_name, p.param_value from trials t "
                "join studies s using(study_id) join trial_params p using(trial_id) "
                "where s.study_name=? and t.state='COMPLETE'", (study,)).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    by_trial: dict[int, dict] = {}
    for tid, name, value in rows:
        by_trial.setdefault(tid, {})[name] = round(value, 9)
    return sorted(json.dumps(p, sort_keys=True) for p in by_trial.values())


def test_killed_tuning_driver_resumes_the_study(ray_2_cpus, tmp_path, gate):
    overrides = [*GERMAN, f"storage.uri={tmp_path}", "tune.num_samples=6", "scheduler=fifo",
                 "search=random"]
    study = study_name(tune_cfg(*overrides), GERMAN_VERSION)
    args = ["jobs.tune", *overrides, f"ray.address={ray_2_cpus}"]
    gate.hold(epoch=2, step=1, let_pass=2)  # two trials finish; the next ones wait there
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=job_env(**gate.env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "mlops_ray.db"
    try:
        wait_until(lambda: len(_complete_params(db, study)) == 2 and len(gate.events("waiting"))
                   == 2 or proc.poll() is not None, 300,
                   what="two finished trials and two held ones")
        assert proc.poll() is None, "the tuning driver died before it was killed"
        before = _complete_params(db, study)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(before) == 2
    # Ray ends a dead driver's trials: the held ones must be gone before the rerun
    held = [e["pid"] for e in gate.events("waiting")]
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in held), 60,
               what="the killed driver's trials ended by Ray")
    gate.release()
    run_tuning(tune_cfg(*overrides))  # the same command again, in this process
    s = json.loads((tmp_path / "tune" / study / "tune.json").read_text())
    assert s["resumed"] is True and s["n_trials"] == 6
    assert all(t["status"] == "TERMINATED" for t in s["trials"])
    final = sorted(json.dumps({k: round(v, 9) for k, v in t["params"].items()
                               if not isinstance(v, list)}, sort_keys=True)
                   for t in s["trials"])
    for p in before:  # every trial finished before the kill is kept, and not run again
        numeric = json.dumps({k: v for k, v in json.loads(p).items()
                              if k != "model.hidden" and k != "train.batch_size"},
                             sort_keys=True)
        assert sum(numeric[:-1] in f for f in final) == 1


def test_killed_trial_worker_resumes_from_its_checkpoint(ray_2_cpus, tmp_path, gate):
    from mlops_ray.cluster.rehearsal import Background
    from tests.conftest import kill_pids
    job = tune_cfg(*GERMAN, f"storage.uri={tmp_path}", "tune.num_samples=2", "scheduler=fifo",
                   "tune.max_concurrent_trials=1", "train.epochs=5")
    gate.hold(epoch=3, step=2)  # after the trial's third checkpoint
    run = Background(lambda: run_tuning(job))
    wait_until(lambda: gate.events("waiting") or run.done(), 240,
               what="the first trial held at epoch 3")
    (held,) = gate.events("waiting")
    kill_pids([held["pid"]])  # its ray::ImplicitFunc process
    gate.release()
    s = run.result(600)
    assert s["n_trials"] == 2 and all(x["status"] == "TERMINATED" for x in s["trials"])
    restored = {x["trial_id"]: (x["restored_from_epoch"], x["epochs"]) for x in s["trials"]
                if x["restored_from_epoch"] >= 0}
    # Tune processed each epoch's checkpoint before the trial went on: it resumes at epoch 3
    assert restored == {held["run"].removeprefix("trial-"): (3, 5)}, restored
