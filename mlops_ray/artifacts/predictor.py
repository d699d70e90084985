"""A registry version's folder -> raw rows in, probabilities and labels out (no Ray). The same
code answers online requests, batch scoring and the offline parity checks of the tests."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class Predictor:
    model: Any
    pre: Any
    signature: dict[str, Any]
    reference: dict[str, Any]
    version: str  # "model:N"

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
        return cls(model.eval(), Preprocessor.from_dict(json.loads(
            (d / "preprocessor.json").read_text())), json.loads((d / "signature.json").read_text()),
            json.loads((d / "reference.json").read_text()), version)

    @property
    def threshold(self) -> float:
        return float(self.signature["threshold"])

    def predict_proba(self, rows: pd.DataFrame) -> np.ndarray:
        import torch
        x = self.pre.transform(rows)
        with torch.inference_mode():
            return torch.sigmoid(self.model(torch.from_numpy(x))).numpy().astype(np.float64)

    def predict_records(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Online path: validated records straight to numbers (no pandas)."""
        import torch
        with torch.inference_mode():
            t = torch.sigmoid(self.model(torch.from_numpy(self.pre.transform_records(records))))
        p = t.numpy().astype(np.float64)
        return p, (p >= self.threshold).astype(np.int64)
