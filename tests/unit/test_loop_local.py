"""The per-worker loop called directly (no Ray session, as a CV fold runs it)."""
from __future__ import annotations

import pytest
import torch

from mlops_ray.artifacts import checkpoint as ckpt_io
from mlops_ray.config import validate
from mlops_ray.config.compose import compose
from mlops_ray.config.train import TrainJob
from mlops_ray.data import prepare
from mlops_ray.errors import DataValidationError
from mlops_ray.train.session import LocalSession
from mlops_ray.train.tasks.tabular import arrays, loop_config, train_loop_per_worker


def _run(tmp_path, *overrides: str) -> tuple[dict, dict]:
    job = validate(compose("train", ["+experiment=german_mlp", "train.epochs=3",
                                     "train.torch_threads=1", *overrides]), TrainJob)
    prepared = prepare(job.dataset, job.seed)
    pre = prepared.preprocessor
    lc = loop_config(job, pre.feature_names, pre.to_dict(), "local")
    out = train_loop_per_worker(lc.plain(), LocalSession(
        str(tmp_path), arrays(prepared, job.penalty_attribute())))
    return out, ckpt_io.load_state(tmp_path)["model"]


def test_local_loop_is_deterministic(tmp_path):
    a, wa = _run(tmp_path / "a")
    b, wb = _run(tmp_path / "b")
    assert [m["train/loss"] for m in a["history"]] == [m["train/loss"] for m in b["history"]]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fairness_penalty_changes_training(tmp_path):
    plain, w0 = _run(tmp_path / "plain")
    fair, w1 = _run(tmp_path / "fair", "train.fairness_penalty.kind=dp",
                    "train.fairness_penalty.weight=5")
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)
    assert fair["history"][0]["train/loss"] != plain["history"][0]["train/loss"]


def test_a_split_without_both_classes_is_refused():
    job = validate(compose("train", ["+experiment=adult_mlp", "dataset.split.test_value=nope"]),
                   TrainJob)
    with pytest.raises(DataValidationError, match="split 'test' has 0 rows"):
        prepare(job.dataset, 0)


def test_step_gate_holds_a_run_until_released(tmp_path, monkeypatch):
    """The test seam the kill tests rely on: a run cannot pass the gate before it is lifted,
    and the first `let_pass` arrivals go on."""
    import threading

    from mlops_ray.train.gate import Gate
    gate = Gate(tmp_path / "gate")
    gate.hold(epoch=1, step=2, let_pass=1)
    monkeypatch.setenv("MLOPS_RAY_STEP_GATE", str(gate.folder))
    first, _ = _run(tmp_path / "first")  # ticket 0: goes on
    assert len(first["history"]) == 3 and gate.events("passed", epoch=1, step=2)
    done = threading.Event()
    t = threading.Thread(target=lambda: (_run(tmp_path / "second"), done.set()), daemon=True)
    t.start()
    from tests.conftest import wait_until
    wait_until(lambda: gate.events("waiting"), 60, what="the second run at the gate")
    assert not done.is_set()  # held: it finishes only after the release below
    assert ckpt_io.load_state(tmp_path / "second")["epoch"] == 1  # epoch 0 saved, no further
    gate.release()
    t.join(60)
    assert done.is_set() and gate.events("released", epoch=1, step=2)
