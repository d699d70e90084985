"""Gradient-boosted trees without Ray: config checks, the boosting loop as a CV fold runs it
(early stopping, the best-round cut, importances), resume after a kill without redoing rounds,
and the booster travelling as weights-only tensors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.train import TREES_TARGET, TrainJob
from mlops_ray.data import prepare
from mlops_ray.errors import ConfigError
from mlops_ray.evaluation.metrics import binary_metrics
from mlops_ray.models import build_model
from mlops_ray.models.trees import TARGET, Trees
from mlops_ray.train.session import LocalSession
from mlops_ray.train.tasks import tabular_loop
from mlops_ray.train.tasks.tabular import arrays, loop_config

LIBS = ["xgboost", "lightgbm"]


def job_of(lib: str, *overrides: str) -> TrainJob:
    return validate(compose("train", ["dataset=german", f"model={lib}", "name=german_trees",
                                      "train.torch_threads=1", *overrides]), TrainJob)


@pytest.fixture(scope="module")
def german():
    return prepare(job_of("xgboost").dataset, 0)


def run(job: TrainJob, prepared, folder, session_cls=LocalSession, resume: bool = False):
    pre = prepared.preprocessor
    lc = loop_config(job, pre.feature_names, pre.to_dict(), "local")
    return tabular_loop(lc.plain(), session_cls(str(folder), arrays(prepared), resume=resume))


def test_the_config_and_the_model_agree_on_the_builder_name():
    assert TREES_TARGET == TARGET


@pytest.mark.parametrize("lib, other", [("xgboost", "num_leaves"),
                                        ("lightgbm", "min_child_weight")])
def test_model_group_fills_defaults_and_drops_the_other_librarys_knobs(lib, other):
    spec = job_of(lib).model.spec()
    assert spec["library"] == lib and spec["num_boost_round"] == 1000
    assert spec["early_stopping_rounds"] == 50 and other not in spec


@pytest.mark.parametrize("override, expected", [
    ("model.learning_rate=0", "model.learning_rate=0: Input should be greater than 0"),
    ("model.library=catboost", "model.library='catboost': Input should be 'xgboost' or "
                               "'lightgbm'"),
    ("+model.n_estimators=5", "model.n_estimators=5: Extra inputs are not permitted"),
    ("model.checkpoint_every_n_rounds=30", "model: checkpoint_every_n_rounds=30 must be a multiple of "
                                           "rounds_per_report=100"),
    ("train.fairness_penalty.kind=dp", "train.fairness_penalty.kind='dp' is not available for "
                                       "model.library=xgboost"),
])
def test_bad_tree_config_names_the_field_and_value(override, expected):
    extra = ["train.fairness_penalty.weight=1"] if "fairness" in override else []
    with pytest.raises(ConfigError) as e:
        job_of("xgboost", override, *extra)
    assert expected in str(e.value)


@pytest.mark.parametrize("lib", LIBS)
def test_boosting_stops_early_and_keeps_the_best_round(tmp_path, german, lib):
    """Reports every rounds_per_report rounds; after early stopping the checkpoint the run
    keeps is the booster cut at its best validation round, with that round's metrics."""
    job = job_of(lib, "model.learning_rate=0.3", "model.early_stopping_rounds=10",
                 "model.rounds_per_report=5")
    out = run(job, german, tmp_path)
    hist = out["history"]
    # every 5 rounds, and once more at the round it stopped
    assert [m["round"] for m in hist[:-1]] == list(range(5, 5 * len(hist) - 4, 5))
    assert hist[-1]["early_stopped"] == 1 and hist[-2]["round"] < hist[-1]["round"] < 1000
    best = out["best_round"]
    assert hist[-1]["round"] - best >= 10  # stopped 10 rounds without improvement
    model, pre, meta = ckpt_io.load_model(tmp_path)
    assert meta["round"] == best and meta["metrics"]["best_round"] == best
    n_rounds = (model.booster.num_boosted_rounds() if lib == "xgboost"
                else model.booster.current_iteration())
    assert n_rounds == best
    rows = german.frame.iloc[german.splits["val"]]
    got = binary_metrics(german.labels(rows), ckpt_io.predict_proba(model, pre.transform(rows)))
    assert got["auc"] == pytest.approx(meta["metrics"]["val/auc"], abs=1e-4)
    imp = model.feature_importances(meta["feature_names"])
    assert sum(imp.values()) == pytest.approx(1.0) and set(imp) == set(meta["feature_names"])


class Killed(Exception):
    pass


def killed_after(n_checkpoints: int):
    class KilledSession(LocalSession):
        """A worker that dies right after its n-th checkpoint is committed."""
        seen = 0

        def report(self, metrics, directory=None, name=None):
            super().report(metrics, directory, name)
            if directory:
                type(self).seen += 1
                if type(self).seen == n_checkpoints:
                    raise Killed
    return KilledSession


@pytest.mark.parametrize("lib", LIBS)
def test_a_killed_run_resumes_without_redoing_rounds_to_the_same_booster(tmp_path, german, lib):
    """Killed after its second checkpoint (round 20), the rerun restores round 20, boosts only
    rounds 21-60 and ends with the same booster as a run never killed."""
    job = job_of(lib, "model.num_boost_round=60", "model.rounds_per_report=10",
                 "model.checkpoint_every_n_rounds=10",
                 "model.early_stopping_rounds=null")
    whole = run(job, german, tmp_path / "whole")
    with pytest.raises(Killed):
        run(job, german, tmp_path / "killed", killed_after(2))
    assert ckpt_io.load_state(tmp_path / "killed")["round"] == 20
    rounds: list[int] = []

    class Counting(LocalSession):
        def report(self, metrics, directory=None, name=None):
            rounds.append(metrics["round"])
            super().report(metrics, directory, name)
    resumed = run(job, german, tmp_path / "killed", Counting, resume=True)
    assert resumed["restored_from"] == {"epoch": 2, "round": 20, "jit": False}
    assert rounds == [30, 40, 50, 60, 60]  # four reports, then the final (best = last) model
    assert [m["round"] for m in resumed["history"]] == [m["round"] for m in whole["history"]]
    a = ckpt_io.load_state(tmp_path / "whole")["model"]["raw"]
    b = ckpt_io.load_state(tmp_path / "killed")["model"]["raw"]
    ma, mb = Trees(lib), Trees(lib)
    ma.load_state_dict({"raw": a})
    mb.load_state_dict({"raw": b})
    x = german.xy("val")[0]
    np.testing.assert_allclose(ma.margins(x), mb.margins(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lib", LIBS)
def test_the_booster_is_a_weights_only_tensor_and_rebuilds_from_its_spec(german, lib):
    from tests.serving import tree_model
    model, spec = tree_model(german, lib, rounds=5)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # a pickled object would be refused
    assert set(state) == {"raw"} and state["raw"].dtype == torch.uint8
    again = build_model(spec, in_features=model.in_features)
    again.load_state_dict(state)
    x = german.xy("val")[0]
    assert torch.equal(again(torch.from_numpy(x)), model(torch.from_numpy(x)))
    empty = Trees(lib)
    with pytest.raises(RuntimeError, match="has no booster"):
        empty(torch.from_numpy(x))


def test_a_race_names_a_candidate_that_is_not_a_model_option():
    from mlops_ray.config.pipeline import PipelineJob
    from mlops_ray.pipeline.race import candidate_job
    job = validate(compose("pipeline", ["+experiment=adult_mlp", "candidates=[mlp,catboost]"]),
                   PipelineJob)
    assert candidate_job(job, "mlp") is job  # the job's own family keeps its experiment's
    assert candidate_job(job, "xgboost").model.spec()["library"] == "xgboost"
    with pytest.raises(ConfigError, match=r"candidates: 'catboost' is not an option of "
                                          r"conf/model/ \(allowed: gpt, lightgbm, mlp, xgboost\)"):
        candidate_job(job, "catboost")
