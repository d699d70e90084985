"""Known-answer tests for metrics, statistics, fairness, gates and the model card (no Ray)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
)
from sklearn.metrics import roc_auc_score

from mlops_ray.errors import ConfigError, GateFailed
from mlops_ray.evaluation import gates as G
from mlops_ray.evaluation.card import downsample_curves, write_model_card
from mlops_ray.evaluation.fairness import (
    SENSITIVE_AT_PREDICTION,
    fairness_report,
    mitigation_summary,
    threshold_optimizer,
)
from mlops_ray.evaluation.metrics import binary_metrics
from mlops_ray.evaluation.stats import (
    bootstrap_ci,
    delong_test,
    mean_std_ci,
    paired_bootstrap_delta,
    roc_auc,
    weighted_auc,
)
from mlops_ray.evaluation.threshold import choose_threshold

# 4 rows: positives score .35 and .8, negatives .1 and .4.
Y4 = np.array([0, 0, 1, 1])
P4 = np.array([0.1, 0.4, 0.35, 0.8])

# Two groups, hand table:          a (8 rows)          b (4 rows)
#   y        1 1 0 0 . . . . 1 0 0 0 | 1 0 0 0
#   pred     1 0 1 0 . . . . 1 1 0 0 | 1 0 0 0
#   rate 4/8=.5 / 1/4=.25   TPR 2/3 / 1   FPR 2/5 / 0   precision 2/4 / 1
Y12 = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0])
PRED12 = np.array([1, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0])
SEX12 = np.array(list("aaaabbbbaaaa"))


def synthetic(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores that depend on y and on a group bias; group b has a lower base rate."""
    rng = np.random.default_rng(seed)
    g = rng.choice(["a", "b"], size=n, p=[0.6, 0.4])
    y = (rng.random(n) < np.where(g == "a", 0.5, 0.25)).astype(int)
    logit = 1.5 * (2 * y - 1) + np.where(g == "a", 0.8, -0.8) + rng.normal(0, 1.0, n)
    return y, 1 / (1 + np.exp(-logit)), g


# ---- metrics and threshold -----------------------------------------------------------------

def test_binary_metrics_hand_computed():
    m = binary_metrics(Y4, P4, threshold=0.5)
    assert m["auc"] == pytest.approx(3 / 4)  # 3 of 4 (pos, neg) pairs ordered
    assert m["accuracy"] == pytest.approx(3 / 4)  # pred 0 0 0 1
    assert m["f1"] == pytest.approx(2 / 3)  # TP 1, FP 0, FN 1
    ll = -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4
    assert m["log_loss"] == pytest.approx(ll)
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # bins [0,.1]: |0-.1|, (.3,.4]: |.5-.375|, (.7,.8]: |1-.8|, weights 1/4, 1/2, 1/4
    assert m["ece"] == pytest.approx(0.25 * 0.1 + 0.5 * 0.125 + 0.25 * 0.2)


def test_choose_threshold_objectives():
    # f1 at t=.1: 4/6, .35: 4/5, .4: 2/4, .8: 2/3 -> .35
    assert choose_threshold(Y4, P4, "f1") == 0.35
    # youden .35 and .8 both 0.5; accuracy .35 and .8 both 3/4: ties go to the higher threshold
    assert choose_threshold(Y4, P4, "youden") == 0.8
    assert choose_threshold(Y4, P4, "accuracy") == 0.8
    with pytest.raises(ValueError, match="allowed"):
        choose_threshold(Y4, P4, "recall")


# ---- stats ---------------------------------------------------------------------------------

def test_mean_std_ci_t_interval():
    r = mean_std_ci([0.90, 0.91, 0.92])
    assert r["mean"] == pytest.approx(0.91) and r["std"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t_{0.975, 2}
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.91 - half, 0.91 + half))
    assert math.isnan(mean_std_ci([0.9])["std"])


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    y, p, _ = synthetic(600)
    a = bootstrap_ci(roc_auc, y, p, n=200, seed=3, strata=y)
    assert a["ci_low"] <= a["value"] <= a["ci_high"] and a["ci_low"] < a["ci_high"]
    assert a == bootstrap_ci(roc_auc, y, p, n=200, seed=3, strata=y)
    assert a != bootstrap_ci(roc_auc, y, p, n=200, seed=4, strata=y)


def test_bootstrap_auc_fast_path_is_the_per_resample_sklearn_interval():
    """roc_auc's interval is computed on multiplicities (one sort); it must be the interval of
    sklearn on each resampled set of rows, ties and one-class resamples (NaN) included."""
    y, p, _ = synthetic(40)
    p = np.round(p, 1)
    rare = (np.arange(20) < 2).astype(int)  # 2 positives in 20: ~12% of resamples have none
    for yy, pp, strata in ((y, p, y), (y, p, None), (rare, p[:20], None)):
        fast = bootstrap_ci(roc_auc, yy, pp, n=300, seed=5, strata=strata)
        slow = bootstrap_ci(lambda a, b: roc_auc(a, b), yy, pp, n=300, seed=5, strata=strata)
        assert fast == pytest.approx(slow, abs=1e-12)


def test_weighted_auc_matches_sklearn_with_ties():
    y, p, _ = synthetic(500)
    p = np.round(p, 1)  # many ties
    idx = np.random.default_rng(0).integers(0, len(y), len(y))
    w = np.bincount(idx, minlength=len(y)).astype(float)[None]
    assert weighted_auc(y, p, w)[0] == pytest.approx(roc_auc_score(y[idx], p[idx]))


def test_delong_identical_and_much_better():
    y, p, _ = synthetic(800)
    same = delong_test(y, p, p)
    assert same["delta"] == 0 and same["p_value"] == pytest.approx(1.0)
    noise = np.random.default_rng(1).random(len(y))
    r = delong_test(y, p, noise)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, p))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, noise))
    assert r["delta"] > 0.2 and r["p_value"] < 1e-6
    assert delong_test(y, noise, p)["p_value_worse"] < 1e-6  # noise is worse than p


def test_delong_variance_agrees_with_bootstrap():
    y, p, _ = synthetic(1500)
    q = p + np.random.default_rng(2).normal(0, 0.15, len(p))
    d, b = delong_test(y, p, q), paired_bootstrap_delta(y, p, q, n=400, seed=0)
    assert d["delta"] == pytest.approx(b["delta"])
    assert d["se"] == pytest.approx(b["se"], rel=0.25)


def test_paired_bootstrap_worse_candidate():
    y, p, _ = synthetic(800)
    worse = p + np.random.default_rng(3).normal(0, 0.4, len(p))
    r = paired_bootstrap_delta(y, worse, p, n=300, seed=0)
    assert r["delta"] < 0 and r["ci_high"] < 0 and r["p_value"] < 0.05
    assert r == paired_bootstrap_delta(y, worse, p, n=300, seed=0)
    # a generic metric goes through the per-resample loop and agrees on the point estimate
    g = paired_bootstrap_delta(y, worse, p, metric=lambda a, b: roc_auc_score(a, b), n=50)
    assert g["delta"] == pytest.approx(r["delta"]) and g["ci_high"] < 0


# ---- fairness ------------------------------------------------------------------------------

def test_fairness_hand_table():
    rep = fairness_report(Y12, PRED12, pd.DataFrame({"sex": SEX12}), min_group_size=4, n_boot=100)
    sex = rep["attributes"]["sex"]
    a, b = sex["groups"]
    assert (a["group"], a["count"], a["small"], b["count"], b["small"]) == ("a", 8, False, 4, False)
    assert (a["rate"], a["tpr"], a["fpr"], a["precision"]) == pytest.approx((0.5, 2 / 3, 0.4, 0.5))
    assert (b["rate"], b["tpr"], b["fpr"], b["precision"]) == pytest.approx((0.25, 1.0, 0.0, 1.0))
    assert sex["small_groups"] == [] and sex["gated_groups"] == ["a", "b"]
    m = rep["metrics"]
    assert m["fair/dp_diff_sex"] == pytest.approx(0.25)
    assert m["fair/dp_ratio_sex"] == pytest.approx(0.5)
    assert m["fair/eo_diff_sex"] == pytest.approx(0.4)  # max(|2/3 - 1|, |0.4 - 0|)
    for name in ("dp_diff", "dp_ratio", "eo_diff"):
        key = f"fair/{name}_sex"
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]
        assert rep["cis"][key] == (m[f"{key}_ci_low"], m[f"{key}_ci_high"])
    # the same numbers as Fairlearn's functions
    assert m["fair/dp_diff_sex"] == demographic_parity_difference(Y12, PRED12, sensitive_features=SEX12)
    assert m["fair/dp_ratio_sex"] == demographic_parity_ratio(Y12, PRED12, sensitive_features=SEX12)
    assert m["fair/eo_diff_sex"] == equalized_odds_difference(Y12, PRED12, sensitive_features=SEX12)
    # b under the minimum size: still in the table, flagged, but no gap is computed with it
    # (a rate from 4 rows would decide the gate); with a alone there is no comparison left
    rep = fairness_report(Y12, PRED12, pd.DataFrame({"sex": SEX12}), min_group_size=5,
                          n_boot=100)
    small = rep["attributes"]["sex"]
    assert [gr["group"] for gr in small["groups"]] == ["a", "b"] and small["small_groups"] == ["b"]
    assert small["gated_groups"] == ["a"] and math.isnan(small["eo_diff"]["value"])
    # the gate on it fails, and says why and what to change
    (res,) = G.evaluate_gates([{"name": "eo", "metric": "fair/eo_diff_sex", "op": "<=",
                              "threshold": 0.2}], rep["metrics"], rep["cis"],
                              undefined=rep["undefined"])
    assert not res.passed and "fewer than two groups of at least 5" in res.detail
    assert "a 8, b 4" in res.detail and "fairness.min_group_size" in res.detail


def test_small_groups_are_reported_but_not_gated():
    """A group of 3 rows with a false-positive rate of 0 decided eo_diff (0.855 on a new
    dataset): now the gaps are over the groups of at least min_group_size rows."""
    y, p, g = synthetic(2000)
    pred = (p >= 0.5).astype(int)
    g = np.asarray(g, dtype=object)
    tiny = np.r_[np.arange(3)]
    y2, pred2, g2 = y.copy(), pred.copy(), g.copy()
    g2[tiny] = "tiny"
    y2[tiny], pred2[tiny] = 0, 0  # FPR 0 in a group of 3
    full = fairness_report(y2, pred2, pd.DataFrame({"sex": g2}), min_group_size=1, n_boot=50)
    gated = fairness_report(y2, pred2, pd.DataFrame({"sex": g2}), min_group_size=30, n_boot=50)
    big = fairness_report(y[3:], pred[3:], pd.DataFrame({"sex": g[3:]}), min_group_size=30,
                          n_boot=50)
    assert full["metrics"]["fair/eo_diff_sex"] > gated["metrics"]["fair/eo_diff_sex"]
    assert gated["metrics"]["fair/eo_diff_sex"] == big["metrics"]["fair/eo_diff_sex"]
    assert gated["attributes"]["sex"]["small_groups"] == ["tiny"]


def test_group_without_positives_has_undefined_tpr():
    # group c: two negatives, one predicted positive -> FPR 0.5, TPR undefined (Fairlearn: 0)
    y = np.r_[Y12, 0, 0]
    pred = np.r_[PRED12, 1, 0]
    g = np.concatenate([SEX12, ["c", "c"]])
    rep = fairness_report(y, pred, pd.DataFrame({"grp": g}), n_boot=50,
                          min_group_size=1)["attributes"]["grp"]
    c = rep["groups"][2]
    assert math.isnan(c["tpr"]) and c["fpr"] == 0.5 and not c["small"]
    assert rep["tpr_undefined"] == ["c"] and rep["fpr_undefined"] == []
    # TPR gap over a, b: 1/3; FPR gap over a, b, c: 0.5
    assert rep["eo_diff"]["value"] == pytest.approx(0.5)


def test_fairness_ci_deterministic_and_covers_every_attribute():
    y, p, g = synthetic(1000)
    s = pd.DataFrame({"sex": g, "race": np.where(np.arange(len(y)) % 50 == 0, "x", "w")})
    r1 = fairness_report(y, (p >= 0.5).astype(int), s, n_boot=100, seed=1)
    r2 = fairness_report(y, (p >= 0.5).astype(int), s, n_boot=100, seed=1)
    assert json.dumps(r1["metrics"]) == json.dumps(r2["metrics"])  # NaN == NaN here
    assert set(r1["attributes"]) == {"sex", "race"}
    race = r1["attributes"]["race"]
    assert race["small_groups"] == ["x"] and race["gated_groups"] == ["w"]  # 20 rows < 30
    assert [gr["group"] for gr in race["groups"]] == ["w", "x"]  # reported all the same


def test_threshold_optimizer_reduces_dp_difference():
    y, p, g = synthetic(3000)
    X = p[:, None]  # the "model" reads its score from the only feature
    val, test = slice(0, 1500), slice(1500, None)
    fitted = threshold_optimizer(lambda x: np.asarray(x)[:, 0], X[val], y[val],
                                 pd.Series(g[val], name="sex"), constraint="demographic_parity")
    before = (p[test] >= 0.5).astype(int)
    after = fitted.predict(X[test], sensitive_features=g[test])
    assert set(np.unique(after)) <= {0, 1}
    np.testing.assert_array_equal(after, fitted.predict(X[test], sensitive_features=g[test]))
    s = mitigation_summary(fitted, y[test], before, after, pd.Series(g[test]))
    assert s["before"]["dp_diff"] > 0.3
    assert s["after"]["dp_diff"] < s["before"]["dp_diff"] / 2
    assert s["requires_sensitive_at_prediction"] and s["note"] == SENSITIVE_AT_PREDICTION
    assert s["attribute"] == "sex"


def test_the_decision_rule_is_fairlearns_and_deterministic():
    """rule.json holds the fitted ThresholdOptimizer's interpolation: its P(label=1) is
    Fairlearn's to the last bit, and its labels are a function of the row (the draw), with
    the rates Fairlearn's random draw has."""
    from mlops_ray.artifacts import rule as R
    y, p, g = synthetic(6000)
    X = p[:, None]
    val, test = slice(0, 3000), slice(3000, None)
    for constraint in ("demographic_parity", "equalized_odds"):
        fitted = threshold_optimizer(lambda x: np.asarray(x)[:, 0], X[val], y[val],
                                     pd.Series(g[val], name="sex"), constraint=constraint)
        rule = R.from_fairlearn(fitted.optimizer, 0.5, "sex", constraint)
        assert json.loads(json.dumps(rule)) == rule  # JSON as it is stored (no inf)
        want = fitted.optimizer._pmf_predict(X[test], sensitive_features=g[test])[:, 1]
        np.testing.assert_array_equal(R.positive_probability(rule, p[test], g[test]), want)
        got = R.labels(rule, p[test], list(g[test]))
        np.testing.assert_array_equal(got, R.labels(rule, p[test], list(g[test])))
        for grp in np.unique(g[test]):  # same selection rate as the random draw, per group
            m = g[test] == grp
            assert abs(got[m].mean() - want[m].mean()) < 0.03
    with pytest.raises(ValueError, match="unknown to the decision rule"):
        R.labels(rule, p[:3], ["alien"] * 3)
    assert R.labels(R.plain(0.5), np.array([0.2, 0.5, 0.9])).tolist() == [0, 1, 1]


# ---- gates ---------------------------------------------------------------------------------

RULES = [
    {"name": "auc", "metric": "test/auc", "op": ">=", "threshold": 0.85, "on": "value"},
    {"name": "eo_sex", "metric": "fair/eo_diff_sex", "op": "<=", "threshold": 0.10,
     "on": "ci_high"},
]
CHAMP = {"name": "champion", "metric": "test/auc", "max_drop": 0.005, "test": "bootstrap",
         "alpha": 0.05}


def test_gates_on_value_and_ci_high():
    cis = {"fair/eo_diff_sex": (0.02, 0.08)}
    ok = G.evaluate_gates(RULES, {"test/auc": 0.9, "fair/eo_diff_sex": 0.05}, cis)
    assert [r.passed for r in ok] == [True, True] and G.verdict(ok)
    # value under the threshold but the CI reaches above it: fails on ci_high
    bad = G.evaluate_gates(RULES, {"test/auc": 0.8, "fair/eo_diff_sex": 0.05},
                           {"fair/eo_diff_sex": (0.02, 0.15)})
    assert [r.passed for r in bad] == [False, False] and not G.verdict(bad)
    assert bad[1].value == 0.05 and bad[1].ci == (0.02, 0.15) and "ci_high" in bad[1].detail
    # missing metric or NaN fails
    miss = G.evaluate_gates(RULES, {"test/auc": float("nan")}, {})
    assert [r.passed for r in miss] == [False, False]
    assert "missing" in miss[1].detail
    table = G.verdict_table(bad)
    assert "FAIL" in table and "eo_sex" in table and "verdict: FAIL (0/2" in table
    assert len({len(line) for line in table.splitlines()[:2]}) == 1  # header and rule aligned


def test_champion_gate():
    y, p, _ = synthetic(1500)
    worse = p + np.random.default_rng(4).normal(0, 0.5, len(p))
    for test in ("bootstrap", "delong"):
        gate = {**CHAMP, "test": test}
        cmp_bad = G.compare_to_champion(gate, y, worse, p, n_boot=300)
        cmp_eq = G.compare_to_champion(gate, y, p, p, n_boot=300)
        bad = G.evaluate_gates([gate], {}, {}, champion=cmp_bad)[0]
        eq = G.evaluate_gates([gate], {}, {}, champion=cmp_eq)[0]
        assert not bad.passed and bad.value < -0.005, test
        assert eq.passed and eq.value == 0, test
    assert G.evaluate_gates([CHAMP], {}, {}, champion=None)[0].passed  # no champion yet
    # a comparison run with another margin does not count
    other = G.compare_to_champion({**CHAMP, "max_drop": 0.1}, y, p, p, n_boot=50)
    assert not G.evaluate_gates([CHAMP], {}, {}, champion=other)[0].passed


def test_validate_gates_names_unknown_metric():
    allowed = G.metric_names(["sex", "race"])
    G.validate_gates(RULES + [CHAMP], allowed)
    with pytest.raises(ConfigError) as e:
        G.validate_gates([{**RULES[0], "name": "typo", "metric": "test/acu"}], allowed)
    msg = str(e.value)
    assert "typo" in msg and "test/acu" in msg and "test/auc" in msg
    with pytest.raises(ConfigError, match="bad op"):
        G.validate_gates([{**RULES[0], "op": "=>"}], allowed)
    with pytest.raises(ConfigError, match="must be 'test/auc'"):
        G.validate_gates([{**CHAMP, "metric": "test/accuracy", "test": "delong"}], allowed)


def test_conf_gate_files_validate():
    import yaml  # ships with Hydra's OmegaConf; only the test reads YAML
    allowed = G.metric_names(["sex", "race"])
    for path in sorted(Path(__file__).resolve().parents[2].glob("conf/gates/*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if "rules" not in spec:  # a dataset's choice: it includes one of the files checked here
            assert spec["defaults"][0] in ("default", "baseline"), path
            continue
        G.validate_gates({**spec, "rules": G.expand_rules(spec["rules"], ["sex", "race"])},
                         allowed)


def test_passed_is_a_function_of_the_report():
    results = G.evaluate_gates(RULES, {"test/auc": 0.9, "fair/eo_diff_sex": 0.05},
                               {"fair/eo_diff_sex": (0.02, 0.08)})
    report = {"gates": [r.to_dict() for r in results]}
    assert G.passed(report)
    G.enforce(report)
    report["gates"][0]["passed"] = False
    assert not G.passed(report)
    with pytest.raises(GateFailed, match="auc"):
        G.enforce(report)
    assert not G.passed({"gates": []})  # fails closed


# ---- model card ----------------------------------------------------------------------------

def test_model_card_files(tmp_path):
    y, p, g = synthetic(800)
    pred = (p >= 0.5).astype(int)
    p_champ = p + np.random.default_rng(5).normal(0, 0.3, len(p))
    sens = pd.DataFrame({"sex": g, "race": np.where(np.arange(len(y)) % 40 == 0, "x", "w")})
    fair = fairness_report(y, pred, sens, n_boot=50)
    folds = [{"fold": i, "rows": 100, "auc": a} for i, a in enumerate([0.88, 0.9, 0.89])]
    metrics = {"test/auc": roc_auc(y, p), **fair["metrics"]}
    results = G.evaluate_gates(RULES, metrics, fair["cis"])
    report = {
        "model": {"name": "adult_mlp", "intended_use": "Teaching example."},
        "lineage": {"run": "adult_mlp-abc", "data_version": "sha256:1", "config_hash": "abc",
                    "code_version": "deadbeef"},
        "data": {"rows": {"train": 600, "test": 800}, "positive_rate": {"test": float(y.mean())},
                 "groups": {"sex": {"a": 480, "b": 320}}},
        "config": {"model": {"hidden": [64, 32]}, "optim": {"lr": 0.001}},
        "cv": {"k": 3, "folds": folds, "summary": {"cv/auc_mean": 0.89, "cv/auc_std": 0.01,
                                                  "cv/auc_ci_low": 0.865, "cv/auc_ci_high": 0.915}},
        "test": {"metrics": {"test/auc": metrics["test/auc"]}, "ci": {"test/auc": [0.8, 0.9]}},
        "threshold": {"objective": "f1", "value": 0.5, "max_rate_ratio": 1.5},
        "fairness": fair,
        "mitigation": {"name": "threshold_optimizer", "constraint": "equalized_odds",
                       "attribute": "sex", "requires_sensitive_at_prediction": True,
                       "note": SENSITIVE_AT_PREDICTION, "before": {"dp_diff": 0.45},
                       "after": {"dp_diff": 0.05}},
        "champion": G.compare_to_champion(CHAMP, y, p, p_champ, n_boot=50),
        "rule": {"threshold": 0.5, "postprocessor": {
            "kind": "group_thresholds", "attribute": "sex", "constraint": "equalized_odds",
            "groups": {"a": {"ops": [[1.0, ">", 0.4], [0.0, ">", 0.4]]}}}},
        "gates": [r.to_dict() for r in results],
        "passed": G.verdict(results),
        "curves": downsample_curves(y, p, max_points=300, p_champion=p_champ),
    }
    assert len(report["curves"]["y_test"]) <= 300
    files = write_model_card(report, tmp_path)
    for key in ("markdown", "html", "roc", "calibration", "cv_auc", "group_rates_sex",
                "group_rates_race"):
        assert files[key].exists() and files[key].stat().st_size > 0, key
    assert files["roc"].read_bytes()[:4] == b"\x89PNG"
    md = files["markdown"].read_text()
    assert "## Gates" in md and "| eo_sex |" in md and "`fair/eo_diff_sex`" in md
    assert "### `sex`" in md and "### `race`" in md and "![roc](roc.png)" in md
    assert "## Limitations" in md and "reported but not gated" in md  # race x is small
    # which figures are of mitigated labels, both rules, and what each gate compared
    assert "**mitigated**, group thresholds on `sex`" in md
    assert "unmitigated threshold would be 0.5" in md
    assert "within 1/1.5x-1.5x the base rate, the best by f1" in md  # the threshold's rationale
    assert "| gate | metric | compared | op | threshold | point |" in md
    assert "needed at prediction time" in md and "## Champion comparison" in md
    assert "`adult_mlp-abc`" in md and "**Gate verdict: FAIL**" in md
    html = files["html"].read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "eo_sex" in html
    assert "Feature importance" not in md and "gradient-boosted" not in md  # an MLP has neither
    # a booster's card: its importances, and what its training did not do
    trees = {**report, "config": {"model": {"library": "xgboost", "max_depth": 6}},
             "feature_importance": {"capital_gain": 0.31, "age": 0.12}}
    md = write_model_card(trees, tmp_path / "trees")["markdown"].read_text()
    assert "## Feature importance (share of the booster's total gain" in md
    assert "| `capital_gain` | 0.310 |" in md
    assert "gradient-boosted trees (xgboost), trained without an in-training fairness" in md


def test_a_stored_report_is_reused_only_for_the_same_evaluation_inputs(tmp_path, monkeypatch):
    """Changing the threshold objective, the mitigation, CV, a gate, the bootstrap count, the
    data version or the code version each makes promote evaluate again."""
    from mlops_ray.config.compose import job
    from mlops_ray.config.evaluate import EvaluateJob
    from mlops_ray.pipeline import evaluate as ev
    from mlops_ray.registry.signing import sign

    def eval_job(*overrides: str) -> EvaluateJob:
        return job("evaluate", EvaluateJob, ["+experiment=adult_mlp", f"run={tmp_path}",
                                             f"storage.uri={tmp_path}", *overrides])
    rec = {"run_uri": "file:///r", "config_hash": "c", "dataset": {"version": "d1"},
           "checkpoints": {"digest": {"best": "x"}}}
    base = eval_job()
    key = b"k"
    report = sign({"lineage": {"run": "file:///r", "data_version": "d1", "config_hash": "c",
                               "checkpoint_digest": "x"}, "champion": None, "gates": [],
                   "inputs": ev.evaluation_inputs(base, rec)}, key)

    def why(j: EvaluateJob, r: dict = rec) -> str | None:
        return ev.needs_evaluation(report, r, None, [], key, ev.evaluation_inputs(j, r))
    assert why(base) is None
    # how the folds are scheduled changes no number in the report: it is reused
    assert why(eval_job("cv.max_parallel=1", "cv.cpus_per_fold=1", "cv.parallel=false")) is None
    for overrides, part in [(["threshold.objective=youden"], "threshold"),
                            (["fairness.mitigation=none"], "fairness"),
                            (["cv.folds=3"], "cv"), (["n_boot=123"], "n_boot"),
                            (["gates.rules.0.threshold=0.5"], "gates")]:
        assert part in (why(eval_job(*overrides)) or ""), overrides
    assert "data_version" in why(base, {**rec, "dataset": {"version": "d2"}})
    monkeypatch.setattr("mlops_ray.runtime.code_version",
                        lambda: {"package": "x", "git_commit": "another"})
    assert "code_version" in why(base)


def test_a_new_dataset_is_gated_against_a_baseline_not_adults_thresholds():
    """dataset=file (and German) compose conf/gates/baseline.yaml: the candidate must not be
    significantly worse than a logistic regression on the same folds; Adult keeps its
    absolute thresholds. The baseline really is trained on the folds."""
    from mlops_ray.config.compose import job
    from mlops_ray.config.evaluate import EvaluateJob
    from mlops_ray.data import prepare
    from mlops_ray.evaluation import baseline, cv
    from tests.conftest import dataset

    def rules(*overrides: str) -> list[str]:
        return [r.name for r in job("evaluate", EvaluateJob, ["run=x", *overrides]).gates.rules]
    assert "vs_baseline" in rules("dataset=file", "dataset.uri=x.csv", "dataset.label=y",
                                  "dataset.numeric=[a]")
    assert "vs_baseline" in rules("+experiment=german_mlp")
    assert "cv_auc" in rules("+experiment=adult_mlp")
    G.validate_gates(G.expand_rules([r.plain() for r in job(
        "evaluate", EvaluateJob, ["run=x", "+experiment=german_mlp"]).gates.rules],
        ["sex", "age_group"]), G.metric_names(["sex", "age_group"]))
    prepared = prepare(dataset("german_mlp"), 0)
    folds = cv.fold_indices(prepared, 3, 0)
    base = baseline.baseline_folds(prepared, folds, 0)
    assert all(0.6 < f["auc"] < 0.95 for f in base)
    worse = baseline.compare([{"auc": f["auc"] - 0.1} for f in base], base)
    assert worse["cv/auc_vs_baseline_mean"] == pytest.approx(-0.1)
    assert worse["cv/auc_vs_baseline_ci_high"] == pytest.approx(-0.1)  # no spread: certain
    same = baseline.compare(base, base)
    assert same["cv/auc_vs_baseline_ci_high"] == 0.0


def test_the_default_threshold_does_not_collapse_on_balanced_data():
    """F1 alone picked a threshold predicting 83% positives at a 45% base rate (accuracy
    0.54); the default guard keeps the predicted-positive rate within 1/1.5x-1.5x."""
    from mlops_ray.evaluation.threshold import choose_threshold
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.45).astype(int)
    p = np.clip(0.45 + 0.06 * (y - 0.45) + rng.normal(0, 0.2, 4000), 0, 1)  # a weak model
    free = choose_threshold(y, p, "f1")
    guarded = choose_threshold(y, p, "f1", max_rate_ratio=1.5)
    assert (p >= free).mean() > 0.8  # the collapse
    assert y.mean() / 1.5 <= (p >= guarded).mean() <= y.mean() * 1.5
    assert ((p >= guarded) == y).mean() > ((p >= free) == y).mean()


def test_deploy_waits_for_serves_early_start_and_raises_its_error():
    """The pipeline starts Serve on a thread during evaluation: deploy waits for that start,
    gets its facts, or raises its error as a start on the main thread would have; a start that
    hangs is a ServeError, not a second start racing it."""
    import threading

    from mlops_ray.errors import ServeError
    from mlops_ray.pipeline import stages
    from mlops_ray.pipeline.context import Context

    def early(result: dict, release: threading.Event) -> Context:
        ctx = Context(job=None, prepared=None, reg=None, log=print, names=[])
        outcome: dict = {}

        def start() -> None:
            assert release.wait(60)
            outcome.update(result)
        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        ctx.serve_start = (thread, outcome)
        return ctx
    go = threading.Event()
    threading.Timer(0.05, go.set).start()  # deploy arrives before the start is done
    assert stages.serve_started(early({"facts": {"address": "a"}}, go)) == {"address": "a"}
    taken = ServeError("serve.port=8000 is taken")
    with pytest.raises(ServeError, match="8000 is taken"):
        stages.serve_started(early({"error": taken}, go))
    # a pipeline that ended before deploy does not raise the start's error over its own
    assert stages.drop_early_serve(early({"error": taken}, go)) is None
    hung = threading.Event()
    with pytest.raises(ServeError, match="did not start within 0 s"):
        stages.serve_started(early({"facts": {}}, hung), timeout_s=0.01)
    hung.set()
    assert stages.serve_started(Context(None, None, None, print, [])) is None  # no early start


def test_drift_tests_without_scipy_stats_equal_scipys() -> None:
    """The drift report's chi-squared p-value and JS distance (computed without SciPy, which a
    job's driver then never imports) equal SciPy's own functions, zero cells, one-sided shifts
    and p-values from 1 down to below 1e-300 included."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chi2, chisquare

    from mlops_ray.evaluation.drift import categorical_shift, chi2_p, chi2_sf, js_distance
    for df in (1, 2, 3, 4, 7, 10, 40, 41, 99, 400):
        for x in (0.0, 1e-8, 0.3, 1.0, df - 0.5, df, 2.0 * df, 10.0 * df + 50, 1500.0):
            assert chi2_sf(x, df) == pytest.approx(float(chi2.sf(x, df)), rel=1e-9, abs=1e-300)
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 500, k).astype(float), rng.dirichlet(np.ones(k)))
             for k in (2, 3, 10, 41)]
    cases.append((np.array([0.0, 0.0, 900.0]), np.array([0.5, 0.4999, 1e-4])))  # a big shift
    cases.append((np.array([30.0, 0.0, 70.0]), np.array([0.3, 0.0001, 0.6999])))
    for live, ref in cases:
        ref = ref / ref.sum()
        want_p = float(chisquare(live, ref * live.sum()).pvalue)
        assert chi2_p(live, ref * live.sum()) == pytest.approx(want_p, rel=1e-9, abs=1e-300)
        want_js = float(jensenshannon(ref, live / live.sum(), base=2))
        assert js_distance(ref, live / live.sum()) == pytest.approx(want_js, rel=1e-12)
    assert chi2_p(np.array([0.0, 0.0, 900.0]), np.array([450.0, 449.9, 0.09])) < 1e-100
    assert chi2_sf(math.inf, 3) == 0.0 and math.isnan(chi2_sf(math.nan, 3))  # as SciPy
    # serving's window and a batch job's counts share one comparison: its p-value is the test's
    js, p = categorical_shift({"a": 0.5, "b": 0.5}, {"a": 10, "c": 30})
    want = chisquare([10.0, 0.0, 30.0], np.array([0.5, 0.5, 1e-4]) / 1.0001 * 40)
    assert p == pytest.approx(float(want.pvalue), rel=1e-9) and 0 < js <= 1
    assert categorical_shift({"a": 1.0}, {"a": 50})[1] is None  # one category: no test


def test_batch_drift_counts_name_values_as_strings() -> None:
    """Scoring actors count categories on the raw values and name them as pandas' string
    conversion does: the counts (and unseen examples) equal those of converting every row
    first, whatever the column holds (mixed objects, numbers, NA kinds, Categorical)."""
    from mlops_ray.predict.drift import EXAMPLES, MISSING, UNSEEN, batch_counts
    rng = np.random.default_rng(1)
    values = ["a", "b", 1, 1.5, True, None, np.nan, pd.NA, "1", "c", *[f"u{i}" for i in range(15)]]
    mixed = pd.Series([values[i] for i in rng.integers(0, len(values), 3000)], dtype=object)
    df = pd.DataFrame({
        "mixed": mixed,
        "ints": pd.Series(rng.integers(0, 20, 3000)),
        "floats": pd.Series(rng.choice([0.5, 2.0, np.nan], 3000)),
        "strings": mixed.astype("string"),
        "words": mixed.map(lambda v: v if v is None or isinstance(v, str) else np.nan),
        "cats": pd.Categorical(rng.choice(["a", "b", "z"], 3000), categories=["a", "b", "y", "z"]),
        "odd_floats": pd.Series(rng.choice([1e-05, 1e20, -0.0, 3.0, 0.1 + 0.2], 3000)),
        "nullable_ints": pd.Series(rng.choice([1, 3, None], 3000), dtype="Int64"),
        "uint8": pd.Series(rng.integers(0, 4, 3000).astype(np.uint8)),
        "bools": pd.Series(rng.choice([True, False, None], 3000), dtype="boolean"),
        "dates": pd.Series(pd.to_datetime(rng.choice(["2024-01-01", "2024-02-03"], 3000))),
        "int_cats": pd.Categorical(rng.integers(0, 3, 3000)),
    })
    known = {"a": 0.3, "b": 0.3, "1": 0.1, "1.5": 0.1, "True": 0.1, "0.5": 0.5, "3": 0.1}
    ref = {"numeric": {}, "categorical": {c: {"shares": known} for c in df.columns}}
    got = batch_counts(df, ref, [], list(df.columns))["categorical"]
    for c in df.columns:
        vc = df[c].astype("string").fillna(MISSING).value_counts()
        want = {k: int(n) for k, n in vc.items() if k in known or k == MISSING}
        unseen = [str(k) for k, n in vc.items() if k not in known and k != MISSING]
        if unseen:
            want[UNSEEN] = int(vc[unseen].sum())
        assert got[c]["counts"] == want, c
        ex = got[c]["unseen_examples"]
        assert set(ex) <= set(unseen) and len(set(ex)) == len(ex) == min(EXAMPLES, len(unseen))
    assert "y" not in got["cats"]["unseen_examples"]  # a category no row has is not seen
