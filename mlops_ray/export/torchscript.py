"""A registry version as one TorchScript module with the whole preprocessing inside.

`forward(numeric, categorical)`: numeric is a float64 tensor [N, len(numeric_columns)] (NaN =
missing -> training median), categorical a list of N lists of strings or None, in
`categorical_columns` order (None or a value outside the training categories -> all-zero
one-hot). Returns (probability float32 [N], label int64 [N]) at the signature's threshold. The
network is traced (any tensor -> tensor model traces); the wrapper with its string handling is
scripted. torch.jit is deprecated in favour of torch.export, but it is still the format that
loads from C++ (libtorch) and needs no Python source.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import torch

from mlops_ray.errors import ExportError


class Folded(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, pre: Any, threshold: float):
        super().__init__()
        self.net = net
        def row(values: dict[str, float]) -> torch.Tensor:  # [1, n_numeric] float64 (CPU)
            return torch.tensor([values[c] for c in pre.numeric], dtype=torch.float64).reshape(1, -1)
        self.medians, self.means, self.stds = row(pre.medians), row(pre.means), row(pre.stds)
        offsets, vocab = len(pre.numeric), []
        for c in pre.categorical:
            vocab.append({v: offsets + k for k, v in enumerate(pre.categories[c])})
            offsets += len(pre.categories[c])
        self.vocab = torch.jit.Attribute(vocab, list[dict[str, int]])
        self.numeric_columns = torch.jit.Attribute(list(pre.numeric), list[str])
        self.categorical_columns = torch.jit.Attribute(list(pre.categorical), list[str])
        self.n_numeric = len(pre.numeric)
        self.n_features = int(pre.n_features)
        self.threshold = float(threshold)

    def forward(self, numeric: torch.Tensor, categorical: list[list[str | None]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n = numeric.shape[0]
        if len(categorical) != n:
            raise ValueError("numeric and categorical must have the same number of rows")
        x = torch.zeros((n, self.n_features), dtype=torch.float32)
        if self.n_numeric > 0:  # float64 scaling, then float32: as Preprocessor.transform
            filled = torch.where(torch.isnan(numeric), self.medians, numeric)
            x[:, :self.n_numeric] = ((filled - self.means) / self.stds).to(torch.float32)
        for r in range(n):
            row = categorical[r]
            for c in range(len(self.vocab)):
                v = row[c]
                if v is not None:
                    j = self.vocab[c].get(v, -1)
                    if j >= 0:
                        x[r, j] = 1.0
        with torch.no_grad():  # callers need not remember inference_mode
            p = torch.sigmoid(self.net(x))
        return p, (p.to(torch.float64) >= self.threshold).to(torch.int64)


def build(model: torch.nn.Module, pre: Any, threshold: float) -> bytes:
    """The saved TorchScript module (bytes for torch.jit.load)."""
    from mlops_ray.models.trees import Trees
    if isinstance(model, Trees):  # a booster is not torch code: tracing would bake in one batch
        raise ExportError(f"format=torchscript: a {model.library} model is a booster, not a "
                          "torch network; export it with format=onnx")
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notes, tracer hints
            warnings.simplefilter("ignore")
            net = torch.jit.trace(model.eval(), torch.zeros(3, pre.n_features))
            scripted = torch.jit.script(Folded(net, pre, threshold))
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
    except Exception as e:  # trace/script errors come in many types; all mean "not exportable"
        raise ExportError(f"TorchScript could not compile the network "
                          f"({type(model).__name__}): {str(e).splitlines()[0]}") from None
    return buf.getvalue()


def inputs(module: Any, records: list[dict[str, Any]]) -> tuple[torch.Tensor, list[list[Any]]]:
    """Raw records -> the module's (numeric, categorical) arguments (what example.py does)."""
    def number(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    numeric = torch.tensor([[number(r.get(c)) for c in module.numeric_columns] for r in records],
                           dtype=torch.float64).reshape(len(records), len(module.numeric_columns))
    categorical = [[None if r.get(c) is None or r.get(c) != r.get(c) else str(r.get(c))
                    for c in module.categorical_columns] for r in records]
    return numeric, categorical
