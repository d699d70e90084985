"""Search spaces as data -> an Optuna define-by-run function (conditional parameters allowed).

A space maps dotted train-config paths to distributions:
    optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.hidden: {type: categorical, choices: [[64, 64], [256, 256]]}
    model.dropout: {type: float, low: 0.0, high: 0.5, when: {model.depth: 2}}
"""
from __future__ import annotations

import copy
import json
from typing import Any


def _encode(choice: Any) -> Any:
    # Optuna categorical choices must be None/bool/int/float/str: lists travel as JSON text
    return json.dumps(choice) if isinstance(choice, (list, dict)) else choice


def decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


class define_by_run:  # noqa: N801 - used like a function; a class so Tune can pickle it
    """Optuna define-by-run sampling of a space; parameters with `when` are conditional."""

    def __init__(self, space: dict[str, dict[str, Any]]):
        self.space = space

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for key, s in self.space.items():
            if s.get("when") and any(decode(chosen.get(k)) != v for k, v in s["when"].items()):
                continue
            if s["type"] == "categorical":
                chosen[key] = trial.suggest_categorical(key, [_encode(c) for c in s["choices"]])
            elif s["type"] == "int":
                chosen[key] = trial.suggest_int(key, int(s["low"]), int(s["high"]),
                                                step=int(s.get("step") or 1), log=s.get("log", False))
            else:
                chosen[key] = trial.suggest_float(key, s["low"], s["high"], step=s.get("step"),
                                                  log=s.get("log", False))


def apply(cfg: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the train config with dotted-path parameters set."""
    out = copy.deepcopy(cfg)
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = decode(value)
    return out


def default_point(cfg: dict[str, Any], space: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The train config's own values as a first trial, or None when one lies outside the space
    (so the study's best is never worse than the untuned defaults)."""
    point: dict[str, Any] = {}
    for key, s in space.items():
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        if s.get("when") and any(point.get(k) != _encode(v) for k, v in s["when"].items()):
            continue
        if s["type"] == "categorical":
            if node not in s["choices"]:
                return None
            point[key] = _encode(node)
        elif not isinstance(node, (int, float)) or not (s["low"] <= node <= s["high"]):
            return None
        else:
            point[key] = node
    return point
