"""Registry versions for serving tests, made from small models fitted in-process on Adult."""
from __future__ import annotations

import io
import json

from mlops_ray.registry import Registry

MODEL = "adult_mlp"


def tree_model(prepared, library: str, rounds: int = 60):
    """A small booster fitted in-process (what jobs.train's trees task checkpoints)."""
    from mlops_ray.models.trees import Trees
    from mlops_ray.train.tasks.trees import library_params
    x, y = prepared.xy("train")
    spec = {"library": library, "learning_rate": 0.1, "max_depth": 4, "min_child_weight": 1.0,
            "num_leaves": 15, "min_child_samples": 20, "subsample": 1.0,
            "colsample_bytree": 1.0, "reg_lambda": 1.0, "reg_alpha": 0.0, "max_bin": 64}
    params = library_params(spec, 0, 1, False)
    if library == "xgboost":
        import xgboost
        booster = xgboost.train(params, xgboost.DMatrix(x, label=y), rounds)
    else:
        import lightgbm
        booster = lightgbm.train(params, lightgbm.Dataset(x, label=y), rounds)
    model = Trees(in_features=x.shape[1], **spec).set_booster(booster)
    return model, {"_target_": "mlops_ray.models.trees.Trees", **spec}


def make_version(reg: Registry, prepared, seed: int, bias: float = 0.0, family: str = "mlp"):
    """Fit a small MLP for a few hundred steps; `bias` shifts its logits afterwards (a version
    with other bytes that predicts the same, or a skewed one). `family` xgboost / lightgbm: a
    small booster instead."""
    import torch

    if family != "mlp":
        model, spec = tree_model(prepared, family)
        return register(reg, prepared, model, spec, seed, bias)

    from mlops_ray.models.mlp import MLP
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
    return register(reg, prepared, model, {"_target_": "mlops_ray.models.mlp.MLP",
                                           "hidden": [16], "dropout": 0.0}, seed, bias)


def register(reg: Registry, prepared, model, spec: dict, seed: int, bias: float):
    """A registry version of `model` (its spec in meta.json) with a passed gate report."""
    import torch

    from mlops_ray.data.profile import profile
    from mlops_ray.pipeline.promote import signature
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    pre = prepared.preprocessor
    ds = {"label": prepared.label, "positive": prepared.positive, "sensitive": prepared.sensitive}
    rows = prepared.frame.iloc[prepared.splits["train"]]
    dumps = json.dumps
    files = {
        "model.pt": buf.getvalue(),
        "meta.json": dumps({"model": spec, "in_features": pre.n_features}).encode(),
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
