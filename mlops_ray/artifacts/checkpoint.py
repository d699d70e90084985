"""The checkpoint folder, as every run writes it and evaluation, promotion and export read it.

    state.pt           model/optimizer/scheduler state, epoch, step, RNG, history, early stopping
    meta.json          model spec and input width, feature names, run name, epoch
    preprocessor.json  the fitted preprocessing

Everything in it is data: state.pt holds tensors and plain values only and is read with
`weights_only=True` (no unpickling of objects), and the model is rebuilt from an allowlist of
builders (mlops_ray.models.build_model). run.json records each kept checkpoint's `digest`,
which the stages after training verify before they load it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from mlops_ray.data.preprocess import Preprocessor
from mlops_ray.models import build_model

FILES = ("state.pt", "meta.json", "preprocessor.json")


def save(directory: str | Path, state: dict[str, Any], meta: dict[str, Any],
         preprocessor: dict[str, Any]) -> None:
    d = Path(directory)
    torch.save(state, d / "state.pt")
    (d / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (d / "preprocessor.json").write_text(json.dumps(preprocessor, sort_keys=True))


def rng_state() -> dict[str, Any]:
    """torch's and numpy's global RNG state as tensors and ints (loadable with weights_only)."""
    import numpy as np
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def load_state(directory: str | Path) -> dict[str, Any]:
    """state.pt as tensors and plain values (`weights_only`: a pickled object in it is refused,
    never run)."""
    import pickle
    try:
        return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        from mlops_ray.errors import UnsafeArtifact
        raise UnsafeArtifact(f"{Path(directory) / 'state.pt'}: holds objects, not only tensors "
                             f"and plain values; refused ({str(e).splitlines()[0][:200]})"
                             ) from None


def digest(directory: str | Path) -> str:
    """sha256 over the checkpoint's files (names and bytes), as run.json records it."""
    h = hashlib.sha256()
    for name in FILES:
        p = Path(directory) / name
        if p.exists():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def verify(directory: str | Path, expected: str | None, what: str) -> None:
    """UnsafeArtifact unless the checkpoint's files are the ones its run recorded."""
    from mlops_ray.errors import UnsafeArtifact
    if not expected:
        raise UnsafeArtifact(f"{what}: its run record has no checkpoint digest (written before "
                             "checkpoints were hashed): train it again")
    got = digest(directory)
    if got != expected:
        raise UnsafeArtifact(f"{what}: checkpoint files do not match the digest in run.json "
                             f"(recorded {expected[:12]}, found {got[:12]}): edited after the "
                             "run; refused")


def load_model(directory: str | Path) -> tuple[torch.nn.Module, Preprocessor, dict[str, Any]]:
    """(model in eval mode, preprocessor, meta) from a checkpoint directory."""
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    model = build_model(meta["model"], in_features=meta["in_features"])  # refused first
    pre = Preprocessor.from_dict(json.loads((d / "preprocessor.json").read_text()))
    model.load_state_dict(load_state(d)["model"])
    return model.eval(), pre, meta


def predict_proba(model: torch.nn.Module, x: Any, batch: int = 65536) -> Any:
    import numpy as np
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(model(torch.as_tensor(x[i:i + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
