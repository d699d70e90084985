"""Composition and validation of every job config: each class of mistake is one clear error."""
from __future__ import annotations

from pathlib import Path

import pytest

from mlops_ray.config import validate
from mlops_ray.config.compose import CONF_DIR, compose
from mlops_ray.config.train import TrainJob
from mlops_ray.errors import ConfigError

# tabular experiments; language-model ones (`task: lm`) have their own schema: tests/unit/test_lm.py
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if "\ntask: lm" not in p.read_text())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    job = validate(compose("train", [f"+experiment={experiment}"]), TrainJob)
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
        validate(compose("train", ["+experiment=adult_mlp", *overrides]), TrainJob)
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
                                     "scaling.resources_per_worker.CPU=0.5"]), TrainJob)
    assert job.scaling.bounds() == (1, 2)


def test_unsupported_storage_scheme():
    assert "gs://" in _errors(["storage.uri=gs://bucket/x"])


def test_dataset_label_cannot_be_a_feature():
    # a cross-field error is its message only: no dump of the dataset section before it
    assert _errors(["dataset.label=age"]) == (
        "invalid config (1 problem(s)):\n  - dataset.label='age' is also listed as a feature")
    assert _errors(["dataset.pii=[age]"]) == (
        "invalid config (1 problem(s)):\n  - dataset.pii: 'age' is PII and cannot also be a "
        "feature, label or sensitive attribute")


def test_several_problems_reported_together():
    msg = _errors(["train.epochs=0", "optim.lr=0"])
    assert "train.epochs" in msg and "optim.lr" in msg and "2 problem(s)" in msg


def test_configs_are_yaml_only():
    assert not list(Path(CONF_DIR).rglob("*.py"))


# ---- jobs.tune -------------------------------------------------------------------------------
from mlops_ray.config.tune import TuneJob  # noqa: E402


def _tune_errors(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose("tune", ["+experiment=adult_mlp", *overrides]), TuneJob)
    return str(e.value)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_has_a_valid_search_space(experiment):
    job = validate(compose("tune", [f"+experiment={experiment}"]), TuneJob)
    assert job.space and job.search.algorithm == "tpe" and job.scheduler.name == "asha"


def test_search_and_scheduler_baselines_compose():
    job = validate(compose("tune", ["+experiment=adult_mlp", "search=random",
                                    "scheduler=fifo"]), TuneJob)
    assert job.search.algorithm == "random" and job.scheduler.name == "fifo"


def _space_errors(**changes) -> str:
    """Edit the composed space as a YAML file would, then validate."""
    cfg = compose("tune", ["+experiment=adult_mlp"])
    for key, value in changes.items():
        cfg["space"][key.replace("__", ".")] = value
    with pytest.raises(ConfigError) as e:
        validate(cfg, TuneJob)
    return str(e.value)


def test_space_low_above_high_names_the_parameter():
    msg = _space_errors(optim__lr={"type": "float", "low": 0.5, "high": 0.1})
    assert "space.optim.lr" in msg and "low=0.5 must be < high=0.1" in msg


def test_space_log_with_non_positive_bound():
    msg = _space_errors(optim__weight_decay={"type": "float", "low": 0, "high": 1, "log": True})
    assert "space.optim.weight_decay" in msg and "log=true needs low > 0" in msg


def test_space_unknown_parameter():
    msg = _space_errors(optim__lrr={"type": "float", "low": 0.1, "high": 0.2})
    assert "space.optim.lrr: unknown parameter" in msg


def test_space_condition_must_refer_to_an_earlier_parameter():
    msg = _space_errors(model__dropout={"type": "float", "low": 0, "high": 0.5,
                                       "when": {"model.depth": 2}})
    assert "space.model.dropout.when" in msg and "model.depth" in msg


def test_concurrent_trials_must_fit_the_cluster():
    msg = _tune_errors(["tune.max_concurrent_trials=8", "scaling.num_workers=2",
                        "scaling.resources_per_worker.CPU=0.5", "ray.num_cpus=2"])
    assert "tune.max_concurrent_trials=8" in msg and "needs 8.08 CPUs" in msg and "has 2" in msg


def test_define_by_run_samples_conditional_params():
    import optuna

    from mlops_ray.tune.space import apply, define_by_run
    space = {"model.hidden": {"type": "categorical", "choices": [[8], [16, 16]]},
             "model.dropout": {"type": "float", "low": 0.1, "high": 0.2,
                               "when": {"model.hidden": [16, 16]}}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        t = study.ask()
        define_by_run(space)(t)
        cfg = apply({"model": {"hidden": [1], "dropout": 0.0}}, t.params)
        seen.add((tuple(cfg["model"]["hidden"]), "model.dropout" in t.params))
        study.tell(t, 0.5)
    assert seen == {((8,), False), ((16, 16), True)}


def test_loss_metrics_must_be_minimised():
    msg = _errors(["checkpoint.checkpoint_score_attribute=val/loss"])
    assert "keeps the worst checkpoints by val/loss" in msg and "'min'" in msg


def test_fairness_penalty_needs_weight_and_a_sensitive_attribute():
    assert "needs weight > 0" in _errors(["train.fairness_penalty.kind=dp"])
    msg = _errors(["train.fairness_penalty.kind=eo", "train.fairness_penalty.weight=1",
                   "train.fairness_penalty.attribute=age"])
    assert "must be one of dataset.sensitive" in msg


def test_elastic_batch_divisible_by_every_world_size():
    msg = _errors(["scaling.num_workers=[2,4]", "scaling.resources_per_worker.CPU=0.5",
                   "train.batch_size=8"])
    assert "num_workers=3" in msg


def test_function_trials_are_single_worker():
    msg = _tune_errors(["tune.trial_backend=function", "scaling.num_workers=2",
                        "scaling.resources_per_worker.CPU=0.5", "tune.max_concurrent_trials=1"])
    assert "tune.trial_backend='function'" in msg


def test_asha_is_refused_for_torchtrainer_trials():
    msg = _tune_errors(["scaling.num_workers=2", "scaling.resources_per_worker.CPU=0.5",
                        "tune.max_concurrent_trials=1"])
    assert "scheduler=asha with TorchTrainer trials" in msg and "scheduler=fifo" in msg
    job = validate(compose("tune", ["+experiment=adult_mlp", "scaling.num_workers=2",
                                    "scaling.resources_per_worker.CPU=0.5", "scheduler=fifo",
                                    "tune.max_concurrent_trials=1"]), TuneJob)
    assert job.tune.backend(2) == "train"


def test_default_point_is_the_experiments_own_config():
    from mlops_ray.tune.space import default_point
    cfg = compose("tune", ["+experiment=adult_mlp"])
    assert default_point(cfg, cfg["space"]) == {
        "optim.lr": 0.001, "optim.weight_decay": 0.0001, "model.hidden": "[256, 256]",
        "model.dropout": 0.1}
    cfg["optim"]["lr"] = 0.5  # outside the space: no default trial
    assert default_point(cfg, cfg["space"]) is None


def test_canary_max_bake_must_cover_the_bake():
    from mlops_ray.config.serve import ServeJob
    with pytest.raises(ConfigError, match=r"serve.rollout.max_bake_s=10.0 is below bake_s=30"):
        validate(compose("serve", ["ref=m", "serve.rollout.max_bake_s=10",
                                   "serve.rollout.bake_s=30"]), ServeJob)


def test_a_job_with_a_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    """What jobs.train does with each kind of mistake (the entry point itself, as a subprocess:
    tests/e2e/test_cli.py): one clear message, exit 2, nothing in storage."""
    from tests.conftest import in_process
    store = tmp_path / "store"
    for overrides, expected in [
            (["+train.epochz=3"], "train.epochz: unknown key"),
            (["optim.lr=abc"], "optim.lr='abc'"),
            (["scaling.num_workers=64"], "64 worker(s)"),
            ([f"dataset.uri={tmp_path}/nope.csv"], "file not found")]:
        def run(job: TrainJob) -> None:
            from mlops_ray.data import prepare
            prepare(job.dataset, job.seed)  # what the driver does first, before Ray
        code = in_process("train", TrainJob, ["+experiment=adult_mlp", f"storage.uri={store}",
                                              *overrides], run)
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err
    assert not store.exists()


def test_the_environment_is_the_lock():
    """`make install` installs requirements.lock: what run records name (ray, torch) and every
    other locked package is at its locked version here."""
    import importlib.metadata as md

    from mlops_ray.runtime import library_versions
    locked = {}
    for line in (CONF_DIR.parent / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            locked[name.lower().replace("_", "-")] = version
    versions = library_versions()
    assert versions["ray"] == locked["ray"]
    assert versions["torch"].split("+")[0] == locked["torch"]
    wrong = {n: (md.version(n), v) for n, v in locked.items()
             if md.version(n).split("+")[0] != v}
    assert not wrong, f"installed != locked: {wrong}"
