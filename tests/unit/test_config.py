"""Composition and validation of every job config: each class of mistake is one clear error."""
from __future__ import annotations

from pathlib import Path

import pytest

from mlops_ray.config import CONF_DIR, compose, validate
from mlops_ray.config.schema import TrainJobCfg
from mlops_ray.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    job = validate(compose("train", [f"+experiment={experiment}"]), TrainJobCfg)
    assert job.name == experiment
    assert job.train.batch_size % job.scaling.bounds()[1] == 0


def test_experiment_is_a_delta_on_the_defaults():
    base = compose("train")
    german = compose("train", ["+experiment=german_mlp"])
    assert base["dataset"]["name"] == "adult" and german["dataset"]["name"] == "german"
    assert german["model"]["hidden"] == [64, 32]
    assert german["optim"]["_target_"] == base["optim"]["_target_"]  # unchanged parts stay


def _errors(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose("train", ["+experiment=adult_mlp", *overrides]), TrainJobCfg)
    return str(e.value)


def test_unknown_key_names_key_and_allowed_keys():
    msg = _errors(["+train.epochz=3"])
    assert "train.epochz" in msg and "unknown key" in msg and "epochs" in msg


def test_wrong_type_names_key_and_value():
    msg = _errors(["train.epochs=ten"])
    assert "train.epochs='ten'" in msg and "integer" in msg


def test_out_of_range():
    msg = _errors(["optim.lr=-1"])
    assert "optim.lr=-1" in msg and "greater than 0" in msg


def test_batch_not_divisible_by_workers():
    msg = _errors(["train.batch_size=513", "scaling.num_workers=2",
                   "scaling.resources_per_worker.CPU=0.5"])
    assert "train.batch_size=513" in msg and "num_workers=2" in msg


def test_more_cpus_than_the_local_cluster():
    msg = _errors(["scaling.num_workers=4", "ray.num_cpus=2"])
    assert "4 worker(s)" in msg and "has 2" in msg


def test_gpu_on_a_machine_without_one():
    msg = _errors(["scaling=gpu", "ray.num_gpus=0"])
    assert "GPU" in msg and "has 0" in msg


def test_bf16_without_gpu():
    assert "train.precision='bf16'" in _errors(["train.precision=bf16"])


def test_unknown_metric_for_early_stopping_and_checkpoints():
    msg = _errors(["train.early_stopping.metric=val/f2",
                   "checkpoint.checkpoint_score_attribute=val/xyz"])
    assert "val/f2" in msg and "val/xyz" in msg and "val/auc" in msg


def test_elastic_workers_bounds():
    assert "[min, max]" in _errors(["scaling.num_workers=[3,1]"])
    job = validate(compose("train", ["+experiment=adult_mlp", "scaling.num_workers=[1,2]",
                                     "scaling.resources_per_worker.CPU=0.5"]), TrainJobCfg)
    assert job.scaling.bounds() == (1, 2)


def test_unsupported_storage_scheme():
    assert "gs://" in _errors(["storage.uri=gs://bucket/x"])


def test_dataset_label_cannot_be_a_feature():
    assert "also listed as a feature" in _errors(["dataset.label=age"])


def test_several_problems_reported_together():
    msg = _errors(["train.epochs=0", "optim.lr=0"])
    assert "train.epochs" in msg and "optim.lr" in msg and "2 problem(s)" in msg


def test_configs_are_yaml_only():
    assert not list(Path(CONF_DIR).rglob("*.py"))
