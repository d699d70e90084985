"""The checkpoint folder, as every run writes it and evaluation, promotion and export read it.

    state.pt           model/optimizer/scheduler state, epoch, step, RNG, history, early stopping
    meta.json          model spec and input width, feature names, run name, epoch
    preprocessor.json  the fitted preprocessing
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mlops_ray.data.preprocess import Preprocessor
from mlops_ray.utils import build


def save(directory: str | Path, state: dict[str, Any], meta: dict[str, Any],
         preprocessor: dict[str, Any]) -> None:
    d = Path(directory)
    torch.save(state, d / "state.pt")
    (d / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (d / "preprocessor.json").write_text(json.dumps(preprocessor, sort_keys=True))


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)


def load_model(directory: str | Path) -> tuple[torch.nn.Module, Preprocessor, dict[str, Any]]:
    """(model in eval mode, preprocessor, meta) from a checkpoint directory."""
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    pre = Preprocessor.from_dict(json.loads((d / "preprocessor.json").read_text()))
    model = build(meta["model"], in_features=meta["in_features"])
    model.load_state_dict(load_state(d)["model"])
    return model.eval(), pre, meta


def predict_proba(model: torch.nn.Module, x: Any, batch: int = 65536) -> Any:
    import numpy as np
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(model(torch.as_tensor(x[i:i + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
