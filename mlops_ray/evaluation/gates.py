"""Validation gates as data (no Ray).

A rule gate compares one number of the report with a threshold:

    {name: test_auc, metric: test/auc, op: ">=", threshold: 0.88, on: ci_low}

`on` picks the number: the point `value`, or the `ci_low` / `ci_high` end of its CI (so
"the upper end of the CI of eo_diff is <= 0.1" is a gate that uncertainty cannot sneak past).
The YAML files in conf/gates/ spell `on` as `compare` and group the gates as
`{rules: [...], champion: {...}}`; `normalise_gates` accepts both spellings.

The champion gate compares the candidate with the current champion on the same test rows:

    {name: champion, metric: test/auc, max_drop: 0.005, test: bootstrap | delong, alpha: 0.05}

It fails when the candidate is significantly worse (one-sided p < alpha) by more than `max_drop`;
an equal candidate passes. It passes, saying so, when there is no champion yet.

Promotion is `passed(report)`: a pure function of the stored gate results, so the decision can be
re-derived from the JSON report alone.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mlops_ray.errors import ConfigError, GateFailed
from mlops_ray.evaluation.stats import delong_test, paired_bootstrap_delta, roc_auc

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
ON = ("value", "ci_low", "ci_high")
TESTS = ("bootstrap", "delong")
_RULE_KEYS = {"name", "metric", "op", "threshold", "on"}
_CHAMPION_KEYS = {"name", "metric", "max_drop", "test", "alpha"}

TEST_METRICS = ("auc", "pr_auc", "accuracy", "f1", "log_loss", "brier", "ece", "threshold")
CV_METRICS = ("auc", "pr_auc", "accuracy", "log_loss", "brier",
              "baseline_auc", "auc_vs_baseline")  # the last two: evaluation/baseline.py
FAIR_METRICS = ("dp_diff", "dp_ratio", "eo_diff")


def expand_rules(rules: Iterable[Mapping[str, Any]], attrs: list[str]) -> list[dict[str, Any]]:
    """`{attr}` in a rule's name and metric -> one rule per sensitive attribute."""
    out = []
    for r in rules:
        if "{attr}" in r["metric"] or "{attr}" in r["name"]:
            out += [{**r, "name": r["name"].format(attr=a), "metric": r["metric"].format(attr=a)}
                    for a in attrs]
        else:
            out.append(dict(r))
    return out


def metric_names(sensitive: Iterable[str]) -> list[str]:
    """Every metric name a report can hold, for validating gates before anything runs."""
    names = [f"test/{m}" for m in TEST_METRICS]
    names += [f"cv/{m}_{s}" for m in CV_METRICS for s in ("mean", "std", "ci_low", "ci_high")]
    names += [f"fair/{m}_{a}" for a in sensitive for m in FAIR_METRICS]
    return names


def is_champion_gate(gate: Mapping[str, Any]) -> bool:
    return "max_drop" in gate


def normalise_gates(gates: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict[str, Any]]:
    """A list of gate dicts from either a list or the conf/gates form `{rules, champion}`;
    `compare` is accepted for `on`; `on` defaults to "value", a champion's name to "champion"."""
    if isinstance(gates, Mapping):
        rules = list(gates.get("rules") or [])
        champ = gates.get("champion")
        gates = rules + ([{"name": "champion", **champ}] if champ else [])
    out = []
    for g in gates:
        g = dict(g)
        if "compare" in g and "on" not in g:
            g["on"] = g.pop("compare")
        if is_champion_gate(g):
            g.setdefault("name", "champion")
            g.setdefault("test", "bootstrap")
            g.setdefault("alpha", 0.05)
        else:
            g.setdefault("on", "value")
        out.append(g)
    return out


def validate_gates(gates: Iterable[Mapping[str, Any]] | Mapping[str, Any],
                   available_metrics: Iterable[str]) -> None:
    """Raise ConfigError listing every bad gate: unknown metric (with the allowed names), bad op or
    `on`, non-numeric threshold, unknown key, duplicate name, or a bad champion test."""
    allowed = sorted(set(available_metrics))
    problems: list[str] = []
    seen: set[str] = set()
    for i, g in enumerate(normalise_gates(gates)):
        name = g.get("name") or f"#{i}"
        label = f"gate '{name}'"
        if name in seen:
            problems.append(f"{label}: duplicate gate name")
        seen.add(name)
        keys = _CHAMPION_KEYS if is_champion_gate(g) else _RULE_KEYS
        if extra := sorted(set(g) - keys):
            problems.append(f"{label}: unknown key(s) {extra}; allowed: {sorted(keys)}")
        metric = g.get("metric")
        if metric not in allowed:
            problems.append(f"{label}: unknown metric {metric!r}; allowed: {', '.join(allowed)}")
        if is_champion_gate(g):
            if g["test"] not in TESTS:
                problems.append(f"{label}: unknown test {g['test']!r}; allowed: {', '.join(TESTS)}")
            if metric != "test/auc":
                problems.append(f"{label}: the paired champion tests compare ROC AUCs on the test "
                                f"rows: metric must be 'test/auc', not {metric!r}")
            if not _number(g["max_drop"]) or g["max_drop"] < 0:
                problems.append(f"{label}: max_drop must be a number >= 0, got {g['max_drop']!r}")
            if not _number(g["alpha"]) or not 0 < g["alpha"] < 1:
                problems.append(f"{label}: alpha must be in (0, 1), got {g['alpha']!r}")
            continue
        if g.get("op") not in OPS:
            problems.append(f"{label}: bad op {g.get('op')!r}; allowed: {', '.join(OPS)}")
        if g["on"] not in ON:
            problems.append(f"{label}: bad on {g['on']!r}; allowed: {', '.join(ON)}")
        if not _number(g.get("threshold")):
            problems.append(f"{label}: threshold must be a number, got {g.get('threshold')!r}")
    if problems:
        raise ConfigError(problems)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class GateResult:
    name: str
    metric: str
    value: float
    threshold: float
    op: str
    on: str
    ci: tuple[float, float] | None
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci is not None else None
        return d


def compare_to_champion(gate: Mapping[str, Any], y: np.ndarray, p_candidate: np.ndarray,
                        p_champion: np.ndarray, n_boot: int = 1000, seed: int = 0
                        ) -> dict[str, Any]:
    """Run the champion gate's paired test on the same test rows; the result is what
    `evaluate_gates` takes as `champion` (and what the report stores)."""
    g = normalise_gates([gate])[0]
    if g["test"] == "delong":
        r = delong_test(y, p_candidate, p_champion, margin=g["max_drop"])
        out = {"candidate": r["auc_a"], "champion": r["auc_b"], "p_value": r["p_value_worse"],
               **{k: r[k] for k in ("delta", "ci_low", "ci_high", "se")}}
    else:
        r = paired_bootstrap_delta(y, p_candidate, p_champion, metric=roc_auc, n=n_boot,
                                   seed=seed, margin=g["max_drop"])
        out = {k: r[k] for k in ("candidate", "champion", "delta", "ci_low", "ci_high", "se",
                                 "p_value")}
    return {"test": g["test"], "metric": g["metric"], "max_drop": g["max_drop"], **out}


def _champion_result(g: dict[str, Any], champion: Mapping[str, Any] | None) -> GateResult:
    common = {"name": g["name"], "metric": g["metric"], "threshold": -float(g["max_drop"]),
              "op": ">=", "on": "value"}
    if champion is None:
        return GateResult(**common, value=float("nan"), ci=None, passed=True,
                          detail="no champion yet: nothing to compare")
    ci = (float(champion["ci_low"]), float(champion["ci_high"]))
    delta, p = float(champion["delta"]), float(champion["p_value"])
    if (champion.get("test"), champion.get("max_drop")) != (g["test"], g["max_drop"]):
        return GateResult(**common, value=delta, ci=ci, passed=False,
                          detail=f"comparison ran as {champion.get('test')} with max_drop "
                                 f"{champion.get('max_drop')}, gate asks {g['test']} with "
                                 f"{g['max_drop']}")
    ok = bool(p >= g["alpha"])
    verdict = "not significantly worse" if ok else "significantly worse"
    return GateResult(**common, value=delta, ci=ci, passed=ok,
                      detail=f"{g['test']}: delta {delta:+.4f} vs champion "
                             f"{float(champion['champion']):.4f}, one-sided p={p:.3g} "
                             f"(alpha {g['alpha']}): {verdict} by more than {g['max_drop']}")


def evaluate_gates(gates: Iterable[Mapping[str, Any]] | Mapping[str, Any],
                   metrics: Mapping[str, float], cis: Mapping[str, tuple[float, float]],
                   champion: Mapping[str, Any] | None = None,
                   undefined: Mapping[str, str] | None = None) -> list[GateResult]:
    """One GateResult per gate. A missing metric, a missing CI or a NaN fails its gate (no
    evidence is not a pass). `champion` is the output of `compare_to_champion`, or None;
    `undefined` says why a metric has no value (shown instead of "undefined")."""
    results = []
    for g in normalise_gates(gates):
        if is_champion_gate(g):
            results.append(_champion_result(g, champion))
            continue
        metric, on, op, thr = g["metric"], g["on"], g["op"], float(g["threshold"])
        value = float(metrics.get(metric, float("nan")))
        ci = (float(cis[metric][0]), float(cis[metric][1])) if metric in cis else None
        if metric not in metrics:
            x, detail = float("nan"), "metric missing from the report"
        elif on == "value":
            x, detail = value, ""
        elif ci is None:
            x, detail = float("nan"), f"no CI for {metric}"
        else:
            x, detail = ci[ON.index(on) - 1], ""
        ok = bool(math.isfinite(x) and OPS[op](x, thr))
        if not detail:
            detail = ((undefined or {}).get(metric) or f"{on} is undefined (NaN)" if math.isnan(x)
                      else f"{on} {x:.4f} {op if ok else 'not ' + op} {thr:g}")
        results.append(GateResult(g["name"], metric, value, thr, op, on, ci, ok, detail))
    return results


def verdict(results: Iterable[GateResult | Mapping[str, Any]]) -> bool:
    """All gates passed. No gates at all is not a pass: promotion fails closed."""
    flags = [r.passed if isinstance(r, GateResult) else bool(r["passed"]) for r in results]
    return bool(flags) and all(flags)


def passed(report: Mapping[str, Any]) -> bool:
    """Whether the report's model may be promoted: a pure function of its gate results."""
    return verdict(report.get("gates") or [])


def enforce(report: Mapping[str, Any], table: bool = False) -> None:
    """Raise GateFailed naming the failed gates unless `passed(report)` (`table`: with the
    verdict table, for callers that did not print it already)."""
    if not passed(report):
        gates = report.get("gates") or []
        raise GateFailed([g["name"] for g in gates if not g["passed"]] or ["(no gates)"],
                         verdict_table(gates) if table else "")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def compared(r: Mapping[str, Any]) -> float:
    """The number a gate result was judged on: its CI bound (on=ci_low / ci_high) or value."""
    ci = r.get("ci")
    if r.get("on") == "ci_low" and ci:
        return float(ci[0])
    if r.get("on") == "ci_high" and ci:
        return float(ci[1])
    return float(r["value"])


def verdict_table(results: Iterable[GateResult | Mapping[str, Any]]) -> str:
    """The gate results as one screen of aligned text, ending with the overall verdict."""
    rows = [r.to_dict() if isinstance(r, GateResult) else dict(r) for r in results]
    # "compared": the statistic the gate actually tests (a CI bound, or the point estimate)
    head = ["gate", "metric", "compared", "op", "threshold", "point", "95% CI", "result"]
    body = [[r["name"], r["metric"], f"{r['on']} {_fmt(compared(r))}", r["op"],
             f"{r['threshold']:g}", _fmt(r["value"]),
             f"[{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]" if r["ci"] else "-",
             "PASS" if r["passed"] else "FAIL"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(head), line(["-" * w for w in widths]), *map(line, body)]
    n_ok = sum(r["passed"] for r in rows)
    out.append(f"verdict: {'PASS' if verdict(rows) else 'FAIL'} ({n_ok}/{len(rows)} gates passed)")
    return "\n".join(out)
