"""Gate-aware tuning without a cluster: the gates estimated on validation rows (known cases),
the CI projected onto the evaluation's test rows, and the searcher recording a finished trial's
constraints in the Optuna study before it is told the objective."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlops_ray.evaluation.feasibility import PREFIX, as_metrics, estimate
from mlops_ray.tune.gating import feasibility, milestones

RULES = [
    {"name": "auc", "metric": "test/auc", "op": ">=", "threshold": 0.8, "compare": "value"},
    {"name": "auc_low", "metric": "test/auc", "op": ">=", "threshold": 0.8, "compare": "ci_low"},
    {"name": "cv_auc", "metric": "cv/auc_mean", "op": ">=", "threshold": 0.8},
    {"name": "cv_stable", "metric": "cv/auc_std", "op": "<=", "threshold": 0.02},
    {"name": "eo_g", "metric": "fair/eo_diff_g", "op": "<=", "threshold": 0.1,
     "compare": "ci_high"},
]


def data(n: int = 4000, unfair: float = 0.0, seed: int = 0):
    """Scores that separate the labels well; `unfair` lowers group b's scores (fewer of its
    positives pass a single threshold: an equalized-odds gap)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    g = np.where(rng.random(n) < 0.5, "a", "b")
    p = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1, n) - unfair * (g == "b"))))
    return y, p, pd.DataFrame({"g": g})


def test_a_good_fair_model_is_feasible_and_unestimable_rules_are_named():
    y, p, s = data()
    est = estimate(y, p, s, RULES, mitigation="none")
    assert est["feasible"] and est["binding"] is None
    assert set(est["constraints"]) == {"auc", "auc_low", "cv_auc", "eo_g"}
    assert "needs the evaluation's CV folds" in est["not_estimated"]["cv_stable"]
    assert est["constraints"]["auc"] == pytest.approx(0.8 - est["values"]["auc"])
    assert est["values"]["auc_low"] < est["values"]["auc"]  # the CI's low end
    assert as_metrics(est) == {**{PREFIX + k: v for k, v in est["constraints"].items()},
                               "feasible": 1.0}
    # plain floats: a trial's checkpoint (weights_only) refuses numpy scalars
    assert all(type(v) is float for v in as_metrics(est).values())


def test_an_unfair_model_is_infeasible_and_the_binding_rule_is_the_gap():
    y, p, s = data(unfair=2.0)
    est = estimate(y, p, s, RULES, mitigation="none")
    assert not est["feasible"] and est["binding"] == "eo_g"
    assert est["values"]["eo_g"] > 0.1 and est["constraints"]["eo_g"] > 0


def test_mitigation_is_fitted_on_one_half_and_judged_on_the_other():
    """The threshold post-processor (as the evaluation fits it) closes the gap it is judged
    on: the same unfair scores become feasible with mitigation=threshold."""
    y, p, s = data(unfair=2.0)
    plain = estimate(y, p, s, RULES, mitigation="none")
    mitigated = estimate(y, p, s, RULES, mitigation="threshold", mitigation_attribute="g")
    assert mitigated["values"]["eo_g"] < plain["values"]["eo_g"] / 2


def test_ci_bounds_are_projected_onto_the_evaluations_test_rows():
    """A CI from 4,000 validation rows is wider than the one 40,000 test rows will give: the
    compared end moves towards the value by sqrt(4,000 / 40,000)."""
    y, p, s = data()
    own = estimate(y, p, s, RULES, mitigation="none")
    projected = estimate(y, p, s, RULES, mitigation="none", judged_rows=40_000)
    value = own["values"]["auc"]
    assert projected["ci_scale"] == pytest.approx(np.sqrt(0.1))
    assert value - projected["values"]["auc_low"] == pytest.approx(
        (value - own["values"]["auc_low"]) * np.sqrt(0.1))


def test_trial_feasibility_and_the_rule_that_bound_most_often():
    def trial(**cons):
        return {"_rows": [{PREFIX + k: v for k, v in cons.items()}]}
    trials = [trial(auc=-0.1, eo=0.05), trial(auc=0.02, eo=0.01), trial(auc=-0.1, eo=0.2),
              {"_rows": [{"val/auc": 0.9}]}]
    g = feasibility(trials)
    assert [t["feasible"] for t in trials] == [False, False, False, None]
    assert [t["binding"] for t in trials] == ["eo", "auc", "eo", None]
    assert g == {"estimated": 3, "feasible": 0, "binding": "eo",
                 "binding_counts": {"eo": 2, "auc": 1}}


def test_asha_milestones_are_where_a_trial_can_be_stopped():
    from mlops_ray.config import validate
    from mlops_ray.config.compose import compose
    from mlops_ray.config.tune import TuneJob
    job = validate(compose("tune", ["+experiment=adult_xgboost"]), TuneJob)
    assert job.max_t() == 10 and milestones(job) == [1, 3, 9]
    fifo = validate(compose("tune", ["+experiment=adult_xgboost", "scheduler=fifo"]), TuneJob)
    assert milestones(fifo) == []


def test_the_searcher_records_constraints_before_telling_the_objective(tmp_path):
    import optuna
    from ray import tune

    from mlops_ray.tune.gating import GateAwareOptunaSearch
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = GateAwareOptunaSearch(space={"x": tune.uniform(0, 1)}, metric="val/auc",
                                   mode="max", study_name="s",
                                   storage=optuna.storages.RDBStorage(url))
    for i, (auc, c) in enumerate([(0.9, 0.2), (0.8, -0.1)]):
        search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"val/auc": auc, PREFIX + "eo_sex": c,
                                           PREFIX + "auc": -0.05, "feasible": float(c <= 0)})
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.constraints for t in trials] == [{"eo_sex": 0.2, "auc": -0.05},
                                               {"eo_sex": -0.1, "auc": -0.05}]
    assert [t.value for t in trials] == [0.9, 0.8]


def test_a_study_with_no_feasible_trial_says_which_rule_bound():
    from mlops_ray.tune.tuner import summary_lines
    trials = [{"trial_id": f"t{i}", "status": "TERMINATED", "epochs": 3, "final_value": v,
               "feasible": False, "binding": b} for i, (v, b) in
              enumerate([(0.93, "eo_race"), (0.92, "eo_race"), (0.91, "eo_sex")])]
    s = {"study": "s", "algorithm": "tpe", "scheduler": "asha", "n_trials": 3,
         "total_epochs": 9, "wall_s": 1.0, "resumed": False, "trials": trials,
         "metric": "val/auc", "mode": "max", "tune_uri": "file:///x", "cost": None,
         "gates": {"aware": True, "estimated": 3, "feasible": 0, "binding": "eo_race",
                   "binding_counts": {"eo_race": 2, "eo_sex": 1}}}
    text = "\n".join(summary_lines(s))
    assert "0 of 3 trials estimated feasible on their validation rows; none was: 'eo_race' " \
           "bound most often ({'eo_race': 2, 'eo_sex': 1}): the best trial will not pass it" \
           in text
    assert "infeasible (eo_sex)" in text
