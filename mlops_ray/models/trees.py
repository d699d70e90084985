"""Gradient-boosted trees (XGBoost, LightGBM) as a torch module, so every stage after training
(checkpoints, CV, gates, registry, Serve, jobs.predict) handles them as it handles the MLP.

`forward(x)` returns the booster's margins (logits); the booster itself is a uint8 buffer
(`raw`: XGBoost's UBJSON model, LightGBM's model text), so it travels in state.pt and model.pt
and is read with `weights_only=True` like any network's weights: data, never pickled code.
Training parameters ride along in the spec (meta.json) and are ignored when rebuilding.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

LIBRARIES = ("xgboost", "lightgbm")
TARGET = "mlops_ray.models.trees.Trees"


def is_tree(spec: dict[str, Any] | None) -> bool:
    return isinstance(spec, dict) and spec.get("_target_") == TARGET


class Trees(torch.nn.Module):
    def __init__(self, library: str = "xgboost", in_features: int | None = None,
                 **params: Any) -> None:
        super().__init__()
        if library not in LIBRARIES:
            raise ValueError(f"model.library={library!r} is not one of {LIBRARIES}")
        self.library, self.in_features, self.params = library, in_features, params
        self.register_buffer("raw", torch.zeros(0, dtype=torch.uint8))
        self._booster: Any = None
        self._stale = False  # `raw` lags the booster (serialised when the state is taken)

    # ------------------------------------------------------------------ the booster
    def set_booster(self, booster: Any) -> Trees:
        """Use `booster` (no copy: the bytes are taken by the next state_dict())."""
        self._booster, self._stale = booster, True
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if self._stale:
            b = self._booster
            data = (bytes(b.save_raw("ubj")) if self.library == "xgboost"
                    else b.model_to_string().encode())
            self.raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
            self._stale = False
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False
                        ) -> Any:
        # the buffer's length is the model's: take it whole instead of copying into a shape
        raw = state_dict["raw"]
        self.raw = raw.detach().clone().to(torch.uint8)
        self._booster, self._stale = None, False
        return torch.nn.modules.module._IncompatibleKeys([], [])

    @property
    def booster(self) -> Any:
        if self._booster is None:
            if self.raw.numel() == 0:
                raise RuntimeError("the tree model has no booster (not trained or not loaded)")
            data = self.raw.numpy().tobytes()
            threads = torch.get_num_threads()  # a Serve replica sets 1
            b: Any
            if self.library == "xgboost":
                import xgboost
                b = xgboost.Booster(params={"nthread": threads})
                b.load_model(bytearray(data))
            else:
                import lightgbm
                b = lightgbm.Booster(model_str=data.decode(), params={"num_threads": threads})
            self._booster = b
        return self._booster

    def margins(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        if self.library == "xgboost":
            out = self.booster.inplace_predict(x, predict_type="margin")
        else:
            out = self.booster.predict(x, raw_score=True)
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.margins(x.detach().cpu().numpy()))

    def feature_importances(self, names: list[str]) -> dict[str, float]:
        """Total gain per input feature, normalised to sum to 1 (features never split on: 0)."""
        if self.library == "xgboost":
            raw = self.booster.get_score(importance_type="total_gain")  # keys f0, f1, ...
            gains = {names[int(k[1:])]: float(v) for k, v in raw.items()}
        else:
            g = self.booster.feature_importance(importance_type="gain")
            gains = {names[i]: float(v) for i, v in enumerate(g)}
        total = sum(gains.values()) or 1.0
        return {n: gains.get(n, 0.0) / total for n in names}
