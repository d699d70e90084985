"""jobs.evaluate on the shared local cluster: CV on Ray, test metrics, fairness + mitigation,
champion comparison, gates, model card; each bad input a clear error before any work.

The stages run in this process on the session's Adult run (the CI profile: fewer folds and
epochs, every step real); one subprocess checks the entry point's exit code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlops_ray.config import validate
from mlops_ray.config.compose import compose, job
from mlops_ray.config.evaluate import EvaluateJob
from mlops_ray.config.pipeline import PipelineJob
from mlops_ray.config.train import TrainJob
from mlops_ray.data import load_table, prepare
from mlops_ray.errors import ConfigError, DataValidationError, RunNotFound
from mlops_ray.evaluation import cv as cvmod
from mlops_ray.pipeline.evaluate import run_evaluation
from mlops_ray.train.driver import run_training
from tests.conftest import PROFILE, copy_run, run_job, wait_until

pytestmark = pytest.mark.ray


def pipeline(store: Path, *overrides: str) -> PipelineJob:
    return job("pipeline", PipelineJob, [*PROFILE, f"storage.uri={store}", *overrides])


def eval_job(run_uri: str, *overrides: str, champion: str | None = None) -> EvaluateJob:
    store = Path(run_uri.removeprefix("file://")).parents[1]
    return pipeline(store, *overrides).evaluate_job(run_uri, champion)


def train(store: Path, *overrides: str) -> dict:
    return run_training(pipeline(store, *overrides).train_job(), log=lambda _: None)


@pytest.fixture(scope="module")
def run(adult_run, tmp_path_factory) -> dict:
    """This module's copy of the session's Adult run (evaluation writes next to it)."""
    return copy_run(adult_run, tmp_path_factory.mktemp("evaluate"))


def test_adult_passes_the_default_gates_and_a_rerun_reuses_its_folds(run):
    logs: list[str] = []
    report = run_evaluation(eval_job(run["run_uri"]), log=logs.append)
    failed = [g for g in report["gates"] if not g["passed"]]
    assert report["passed"], failed
    cv = report["cv"]["summary"]
    assert cv["cv/auc_mean"] >= 0.88 and len(report["cv"]["folds"]) == 3
    assert cv["cv/auc_ci_low"] <= cv["cv/auc_mean"] <= cv["cv/auc_ci_high"]
    fair = report["fairness"]["metrics"]
    assert fair["fair/eo_diff_sex_ci_high"] <= 0.10
    assert report["mitigation"]["requires_sensitive_at_prediction"] is True
    assert report["mitigation"]["after"]["eo_diff"] < report["mitigation"]["before"]["eo_diff"]
    assert 0 < report["threshold"]["value"] < 1
    run_dir = Path(run["run_uri"].removeprefix("file://"))
    on_disk = json.loads((run_dir / "eval" / "gate_report.json").read_text())
    assert on_disk["passed"] is True and on_disk["lineage"]["data_version"]
    card = (run_dir / "eval" / "model_card.md").read_text()
    assert "eo_sex" in card and "race" in card and "cv_auc" in card
    assert (run_dir / "eval" / "model_card.html").stat().st_size > 10_000
    assert (run_dir / "eval" / "roc.png").exists()
    # a rerun reuses every finished fold
    logs.clear()
    again = run_evaluation(eval_job(run["run_uri"]), log=logs.append)
    assert not any("to train" in line for line in logs)
    assert again["cv"]["folds"] == report["cv"]["folds"]


def test_parallel_cv_equals_sequential_and_takes_over_folds_started_ahead(ray_2_cpus):
    from mlops_ray.train.folds import FoldsAhead, train_folds
    run_job_ = validate(compose("train", ["+experiment=german_mlp", "train.epochs=2"]), TrainJob)
    prepared = prepare(run_job_.dataset, run_job_.seed)
    folds = cvmod.fold_indices(prepared, 3, run_job_.seed)
    par = train_folds(run_job_, prepared, folds, [0, 1, 2], parallel=True, log=lambda _: None)
    seq = train_folds(run_job_, prepared, folds, [0, 1, 2], parallel=False)
    assert par == seq

    # started beside a training run (jobs.pipeline): finished folds and the one under way are
    # taken over, not trained again; the rest are evaluation's as usual
    ahead = FoldsAhead(run_job_, prepared, lambda: folds, run_cpus=0)  # no run beside it
    try:
        wait_until(lambda: 1 in ahead.started() or not ahead.alive(), 300, interval=0.2,
                   what="fold 0 trained ahead, fold 1 started")
        assert ahead.error is None and not ahead.skipped, (ahead.error, ahead.skipped)
        logs: list[str] = []
        assert train_folds(run_job_, prepared, folds, [0, 1, 2], log=logs.append,
                           ahead=ahead) == seq
    finally:
        ahead.cancel()
    assert f"  fold 0: auc {seq[0]['auc']:.4f} (trained beside the run)" in logs, logs
    assert any(line.startswith(f"  fold 1: auc {seq[1]['auc']:.4f} (") and "beside the run)"
               in line for line in logs), logs
    assert sum("fold 0" in line for line in logs) == 1 and len(logs) == 3, logs
    # a fold trained ahead for other epochs is not this fold: dropped, trained as asked
    other = FoldsAhead(run_job_, prepared, lambda: folds, epochs=1, run_cpus=0)
    try:
        wait_until(lambda: 0 in other.results or not other.alive(), 300, interval=0.2,
                   what="fold 0 trained ahead for 1 epoch")
        assert 0 in other.results and other.results[0] != seq[0], other.error
        logs.clear()
        assert train_folds(run_job_, prepared, folds, [0], log=logs.append, ahead=other) == \
            {0: seq[0]}
    finally:
        other.cancel()
    assert logs == ["  folds started beside the run are not these folds (config, data, rows, "
                    "epochs or CPUs differ): cancelled", f"  fold 0: auc {seq[0]['auc']:.4f}"]


def test_biased_candidate_fails_the_fairness_gate(ray_2_cpus, tmp_path):
    """Training labels flipped to 0 for women, sex used as a feature: the report names it; the
    job (a subprocess, as a user runs it) exits 5."""
    df = load_table("builtin://adult")
    flip = (df["uci_split"] == "train") & (df["sex"] == "Female")
    df.loc[flip, "income"] = 0
    path = tmp_path / "biased.parquet"
    df.to_parquet(path)
    data = [f"dataset.uri={path}", "dataset.sensitive_as_features=true"]
    rec = train(tmp_path, *data)
    out = run_job(["jobs.evaluate", "+experiment=adult_mlp", f"run={rec['run_uri']}", *data,
                   "fairness.mitigation=none", "cv.folds=2", "cv.epochs=1", "n_boot=50",
                   "fairness.n_boot=50", f"ray.address={ray_2_cpus}",
                   f"storage.uri={tmp_path}"], timeout=600)
    assert out.returncode == 5, out.stderr[-3000:]
    assert "eo_sex" in out.stderr and "FAIL" in out.stdout + out.stderr
    assert (out.stdout + out.stderr).count("verdict: FAIL") == 1  # the table once
    report = json.loads((Path(rec["run_uri"].removeprefix("file://")) / "eval" /
                         "gate_report.json").read_text())
    gate = next(g for g in report["gates"] if g["name"] == "eo_sex")
    assert gate["passed"] is False and gate["metric"] == "fair/eo_diff_sex"
    assert gate["value"] > 0.10 and gate["ci"][1] > gate["threshold"] == 0.10


def test_champion_gate(run, tmp_path):
    weak = train(tmp_path, "train.epochs=1", "optim.lr=0.00003", "model.hidden=[8]")
    quick = ["cv.folds=2"]
    worse = run_evaluation(eval_job(weak["run_uri"], *quick, champion=run["run_uri"]),
                           log=lambda _: None)
    champ = next(g for g in worse["gates"] if g["name"] == "champion")
    assert champ["passed"] is False and champ["value"] < -0.005
    same = copy_run(run, tmp_path / "same")  # the same model: no difference at all
    equal = run_evaluation(eval_job(same["run_uri"], *quick, champion=run["run_uri"]),
                           log=lambda _: None)
    champ = next(g for g in equal["gates"] if g["name"] == "champion")
    assert champ["passed"] is True and champ["value"] == 0


def test_bad_inputs_fail_before_any_work(run, tmp_path):
    run_dir = Path(run["run_uri"].removeprefix("file://"))

    def outputs() -> list[str]:
        return sorted(p.name for p in (run_dir / "eval").rglob("*")) \
            if (run_dir / "eval").exists() else []
    before = outputs()
    typo = eval_job(run["run_uri"])
    bad = typo.gates.rules[0].model_copy(update={"name": "typo", "metric": "test/acuracy"})
    typo.gates.rules.append(bad)
    with pytest.raises(ConfigError, match="test/acuracy"):
        run_evaluation(typo)
    with pytest.raises(DataValidationError, match="zodiac"):
        run_evaluation(eval_job(run["run_uri"], "fairness.attributes=[sex,zodiac]"))
    with pytest.raises(RunNotFound, match="no run.json"):
        run_evaluation(eval_job(str(tmp_path / "runs" / "nope")))
    assert outputs() == before
