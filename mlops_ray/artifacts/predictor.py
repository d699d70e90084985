"""A registry version's folder -> raw rows in, probabilities and labels out (no Ray). The same
code answers online requests, batch scoring and the offline parity checks of the tests."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlops_ray.artifacts import rule as rule_mod


@dataclass
class Predictor:
    model: Any
    pre: Any
    signature: dict[str, Any]
    reference: dict[str, Any]
    version: str  # "model:N"
    rule: dict[str, Any] = field(default_factory=dict)  # rule.json: probability -> label

    @classmethod
    def load(cls, folder: str | Path, version: str) -> Predictor:
        import torch

        from mlops_ray.data.preprocess import Preprocessor
        from mlops_ray.models import build_model
        d = Path(folder)
        meta = json.loads((d / "meta.json").read_text())
        model = build_model(meta["model"], in_features=meta["in_features"])
        model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
        torch.set_num_threads(1)  # a replica is one core's worth; batching gives the throughput
        sig = json.loads((d / "signature.json").read_text())
        return cls(model.eval(), Preprocessor.from_dict(json.loads(
            (d / "preprocessor.json").read_text())), sig,
            json.loads((d / "reference.json").read_text()), version, judged_rule(d, sig))

    @property
    def threshold(self) -> float:
        return float(self.signature["threshold"])

    @property
    def attribute(self) -> str | None:
        """The input the decision rule needs besides the model's (its fairness attribute)."""
        return rule_mod.attribute(self.rule)

    def labels(self, p: np.ndarray, groups: Any = None) -> np.ndarray:
        """Labels by the judged decision rule (`groups`: the rule's attribute, if it has one)."""
        return rule_mod.labels(self.rule, p, groups)

    def predict_proba(self, rows: pd.DataFrame) -> np.ndarray:
        import torch
        x = self.pre.transform(rows)
        with torch.inference_mode():
            return torch.sigmoid(self.model(torch.from_numpy(x))).numpy().astype(np.float64)

    def predict_records(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Online path: validated records straight to numbers (no pandas); labels by the
        judged rule."""
        import torch
        with torch.inference_mode():
            t = torch.sigmoid(self.model(torch.from_numpy(self.pre.transform_records(records))))
        p = t.numpy().astype(np.float64)
        a = self.attribute
        return p, self.labels(p, [r.get(a) for r in records] if a else None)

    def predict(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) of a table's rows, as the gates judged them."""
        p = self.predict_proba(rows)
        a = self.attribute
        if a and a not in rows.columns:
            from mlops_ray.errors import InputInvalid
            raise InputInvalid(self.version, [f"column {a!r} is missing: {self.version}'s "
                                              "decision rule (its fairness post-processor) "
                                              "needs it"])
        return p, self.labels(p, rows[a].tolist() if a else None)


def judged_rule(folder: Path, signature: dict[str, Any]) -> dict[str, Any]:
    """The version's decision rule (rule.json; a version without one: its plain threshold),
    refused if it is not the rule its gate report judged."""
    f = folder / "rule.json"
    rule = json.loads(f.read_text()) if f.exists() else rule_mod.plain(signature["threshold"])
    report_f = folder / "gate_report.json"
    if report_f.exists():
        judged = json.loads(report_f.read_text()).get("rule_sha256")
        if judged is not None and judged != rule_mod.digest(rule):
            from mlops_ray.errors import UnsafeArtifact
            raise UnsafeArtifact(f"{folder.name}: the decision rule it would serve (sha256 "
                                 f"{rule_mod.digest(rule)[:12]}) is not the one its gates judged "
                                 f"({judged[:12]}); refused")
    return rule
