"""The decision rule: probability -> label, exactly as the gates judged it and as every consumer
(Serve, jobs.predict, jobs.export, the smoke test) applies it. No Ray, no Hydra, no Fairlearn.

    {"threshold": 0.43, "postprocessor": null}                    # plain threshold
    {"threshold": 0.43, "postprocessor": {                        # Fairlearn ThresholdOptimizer
        "kind": "group_thresholds", "attribute": "sex", "constraint": "equalized_odds",
        "groups": {"Male": {"ops": [[0.7, ">", 0.41], [0.3, ">", 0.38]],
                            "p_ignore": 0.1, "constant": 0.25}, ...}}}

A group's entry is Fairlearn's interpolation: with weight p0 the first operation, with p1 the
second, mixed with a constant (equalized odds): P(label=1) = p_ignore * constant +
(1 - p_ignore) * (p0*[score op0 t0] + p1*[score op1 t1]). Thresholds of +-inf are stored as
2 and -1 (scores are probabilities in [0, 1]). Fairlearn draws the label with a
random number per row; here the draw is `frac(1000 * probability)` in float32 arithmetic: as
uniform over the rows as a random draw, but a function of the row, so the same request always
gets the same label, and an ONNX graph computes it bit for bit. The gates judge this rule; a
version stores it (rule.json) with its hash in the signed gate report.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

DRAW_SCALE = np.float32(1000.0)


def plain(threshold: float) -> dict[str, Any]:
    return {"threshold": float(threshold), "postprocessor": None}


def digest(rule: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(rule, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def attribute(rule: dict[str, Any]) -> str | None:
    """The input the rule needs at prediction time (None: the model's inputs suffice)."""
    pp = rule.get("postprocessor")
    return pp["attribute"] if pp else None


def draw(p: np.ndarray) -> np.ndarray:
    """The per-row number in [0, 1) the randomised thresholds use (float32 arithmetic)."""
    x = np.asarray(p, dtype=np.float32) * DRAW_SCALE
    return (x - np.floor(x)).astype(np.float32)


def group_names(values: Any) -> np.ndarray:
    """Attribute values as the rule's group names: strings, a missing value is "missing"."""
    return np.array(["missing" if v is None or (isinstance(v, float) and v != v) else str(v)
                     for v in (values if values is not None else [])], dtype=object)


def _op(score: np.ndarray, op: str, t: float) -> np.ndarray:
    return score > t if op == ">" else score < t


def positive_probability(rule: dict[str, Any], p: np.ndarray, groups: Any = None) -> np.ndarray:
    """P(label = 1) under the rule (0/1 without a post-processor)."""
    p = np.asarray(p, dtype=np.float64)
    pp = rule.get("postprocessor")
    if not pp:
        return (p >= rule["threshold"]).astype(np.float64)
    g = group_names(groups)
    out = np.full(len(p), np.nan)
    for name, gr in pp["groups"].items():
        (p0, op0, t0), (p1, op1, t1) = gr["ops"]
        m = g == name
        v = p0 * _op(p[m], op0, t0) + p1 * _op(p[m], op1, t1)
        out[m] = gr.get("p_ignore", 0.0) * gr.get("constant", 0.0) + (
            1 - gr.get("p_ignore", 0.0)) * v
    if np.isnan(out).any():
        unknown = sorted(set(g[np.isnan(out)].tolist()))[:5]
        raise ValueError(f"{pp['attribute']}: group(s) {unknown} unknown to the decision rule "
                         f"(known: {sorted(pp['groups'])})")
    return out


def labels(rule: dict[str, Any], p: np.ndarray, groups: Any = None) -> np.ndarray:
    """The labels the rule gives (`groups`: the attribute's values, when it needs them)."""
    pmf = positive_probability(rule, p, groups)
    if not rule.get("postprocessor"):
        return pmf.astype(np.int64)
    return (draw(p) < pmf).astype(np.int64)


def from_fairlearn(optimizer: Any, threshold: float, attribute: str, constraint: str
                   ) -> dict[str, Any]:
    """The rule of a fitted Fairlearn ThresholdOptimizer (its interpolated thresholder)."""
    def t(x: float) -> float:
        return 2.0 if x == np.inf else -1.0 if x == -np.inf else float(x)
    groups = {}
    for name, b in optimizer.interpolated_thresholder_.interpolation_dict.items():
        gr: dict[str, Any] = {"ops": [[float(b.p0), b.operation0.operator, t(b.operation0.threshold)],
                                      [float(b.p1), b.operation1.operator, t(b.operation1.threshold)]]}
        if "p_ignore" in b:
            gr.update(p_ignore=float(b.p_ignore), constant=float(b.prediction_constant))
        groups[str(name)] = gr
    return {"threshold": float(threshold), "postprocessor": {
        "kind": "group_thresholds", "attribute": attribute, "constraint": constraint,
        "groups": groups}}
