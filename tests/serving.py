"""Registry versions for serving tests, made from small models fitted in-process on Adult."""
from __future__ import annotations

import io
import json

from mlops_ray.registry import Registry

MODEL = "adult_mlp"


def make_version(reg: Registry, prepared, seed: int, bias: float = 0.0):
    """Fit a small MLP for a few hundred steps; `bias` shifts its logits afterwards (a version
    with other bytes that predicts the same, or a skewed one)."""
    import torch

    from mlops_ray.data.profile import profile
    from mlops_ray.models.mlp import MLP
    from mlops_ray.pipeline.promote import signature
    torch.manual_seed(seed)
    x, y = prepared.xy("train")
    model = MLP(prepared.preprocessor.n_features, hidden=[16], dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        idx = torch.randint(0, len(xt), (1024,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.net[-1].bias += bias
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    pre = prepared.preprocessor
    ds = {"label": prepared.label, "positive": prepared.positive, "sensitive": prepared.sensitive}
    rows = prepared.frame.iloc[prepared.splits["train"]]
    dumps = json.dumps
    files = {
        "model.pt": buf.getvalue(),
        "meta.json": dumps({"model": {"_target_": "mlops_ray.models.mlp.MLP", "hidden": [16],
                                      "dropout": 0.0},
                            "in_features": pre.n_features}).encode(),
        "preprocessor.json": dumps(pre.to_dict()).encode(),
        "signature.json": dumps(signature(pre, ds, 0.5, False)).encode(),
        "reference.json": dumps(profile(rows, pre.numeric, pre.categorical + ["sex", "race"]
                                        )).encode(),
    }
    meta = {"run_uri": f"run-{seed}-{bias}", "data_version": prepared.version}
    files["gate_report.json"] = passed_report(reg, meta)
    return reg.register(MODEL, files, meta)


def passed_report(reg: Registry, meta: dict) -> bytes:
    """A gate report that passed, about `meta`'s run, signed with the registry's key (what an
    evaluation holding the key writes; the registry reads the verdict from it)."""
    from mlops_ray.registry.signing import sign
    return json.dumps(sign({"passed": True, "champion": None, "lineage": {
        "run": meta.get("run_uri"), "data_version": meta.get("data_version"),
        "config_hash": meta.get("config_hash")}}, reg.key)).encode()
