"""The example scripts shipped in bundles. They run with the bundle's runtime alone (ONNX:
onnxruntime + numpy; TorchScript: torch), outside this repository, so they import nothing from
mlops_ray. Tests run them in a fresh virtual environment."""
from __future__ import annotations

ONNX_EXAMPLE = '''\
"""Score rows with model.onnx using onnxruntime and numpy only (no torch, no Ray, no network).

    python example.py [rows.json]     # default: example_rows.json next to this file
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
data = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "example_rows.json").read_text())
rows = data["rows"]  # raw records {column: value}; null = missing
session = ort.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])


def number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")  # missing or not a number: the graph imputes the training median


def column(inp):  # numbers: float64 [N, 1]; categories: strings [N, 1], "" = missing
    if inp.type == "tensor(string)":
        values = ["" if r.get(inp.name) is None else str(r.get(inp.name)) for r in rows]
        return np.array(values, dtype=object).reshape(-1, 1)
    return np.array([number(r.get(inp.name)) for r in rows], dtype=np.float64).reshape(-1, 1)


feeds = {inp.name: column(inp) for inp in session.get_inputs()}
probability, label = session.run(["probability", "label"], feeds)
for i, (p, y) in enumerate(zip(probability, label)):
    print(f"row {i}: probability {p:.9f} label {y}")
expected = data.get("expected", {}).get("probability")
if expected is not None and len(expected) == len(rows):
    print(f"max |difference| to the served model: {np.max(np.abs(probability - expected)):.2e}")
'''

TORCHSCRIPT_EXAMPLE = '''\
"""Score rows with model.torchscript.pt using torch only (no Ray, no network, no mlops_ray).

    python example.py [rows.json]     # default: example_rows.json next to this file
"""
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
data = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "example_rows.json").read_text())
rows = data["rows"]  # raw records {column: value}; null = missing
model = torch.jit.load(str(HERE / "model.torchscript.pt"))


def number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")  # missing or not a number: the module imputes the training median


numeric = torch.tensor([[number(r.get(c)) for c in model.numeric_columns] for r in rows],
                       dtype=torch.float64).reshape(len(rows), len(model.numeric_columns))
categorical = [[None if r.get(c) is None else str(r.get(c)) for c in model.categorical_columns]
               for r in rows]
with torch.inference_mode():
    probability, label = model(numeric, categorical)
for i, (p, y) in enumerate(zip(probability.tolist(), label.tolist())):
    print(f"row {i}: probability {p:.9f} label {y}")
expected = data.get("expected", {}).get("probability")
if expected is not None and len(expected) == len(rows):
    diff = max((abs(a - b) for a, b in zip(probability.tolist(), expected)), default=0.0)
    print(f"max |difference| to the served model: {diff:.2e}")
'''
