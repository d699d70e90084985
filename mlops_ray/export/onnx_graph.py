"""A registry version as one ONNX graph: raw columns in, the version's preprocessing as ONNX
operators, the network exported by torch.onnx, probability and label out.

Inputs, one per model column, shape [N, 1]: numeric columns as float64 (NaN = missing ->
training median), categorical columns as strings (a value outside the training categories,
including "" for missing, -> all-zero one-hot, as in training). Numeric scaling runs in float64
and is cast to float32 afterwards, exactly as `Preprocessor.transform` does, so the features
match the served model's bit for bit; only the network's float32 arithmetic can differ.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from mlops_ray.errors import ExportError

OPSET = 20  # Equal on strings needs opset 19; onnxruntime >= 1.17 runs 20
TREE_OPSET = 15  # the highest onnxmltools' tree converters target
RESERVED = ("probability", "label")  # output names; the prefixes below name internal tensors
PREFIXES = ("pre/", "net/", "post/")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx logs a warning per optional torchvision op and deprecation notes; the job's
    output should be the bundle, not those."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_trees(model: Any, n_features: int) -> Any:
    """A booster (mlops_ray.models.trees.Trees) as features [N, F] float32 -> probability [N],
    by onnxmltools' converter. Its known gaps (e.g. some base_score and sampling settings)
    show up as a failed parity check, never as a written bundle."""
    import onnxmltools
    from onnx import helper, numpy_helper
    from onnxmltools.convert.common.data_types import FloatTensorType
    kinds = [("features", FloatTensorType([None, n_features]))]
    convert = (onnxmltools.convert_xgboost if model.library == "xgboost"
               else onnxmltools.convert_lightgbm)
    try:
        with _quiet():
            kwargs = {"zipmap": False} if model.library == "lightgbm" else {}
            proto = convert(model.booster, initial_types=kinds, target_opset=TREE_OPSET, **kwargs)
    except Exception as e:  # the converters raise many types; all mean "not exportable"
        raise ExportError(f"onnxmltools could not convert the {model.library} booster: "
                          f"{str(e).splitlines()[0]}") from None
    g = proto.graph
    probs = next(o.name for o in g.output if o.type.tensor_type.elem_type == 1)  # float
    # column 1 of [N, 2] class probabilities is the positive class's
    g.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "tree_pos"))
    g.node.append(helper.make_node("Gather", [probs, "tree_pos"], ["tree_p1"], axis=1))
    g.node.append(helper.make_node("Flatten", ["tree_p1"], ["tree_flat"], axis=0))
    g.node.append(helper.make_node("Squeeze", ["tree_flat", "tree_zero"], ["probability"]))
    g.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "tree_zero"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("probability", 1, ["batch"]))
    # the main graph's opset (20) runs these nodes; the tree ensemble keeps its ai.onnx.ml one
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", OPSET),
                               helper.make_opsetid("ai.onnx.ml", 3)])
    return proto


def export_network(model: Any, n_features: int) -> Any:
    """features [N, F] float32 -> sigmoid(model(features)), as an ONNX ModelProto."""
    import torch

    from mlops_ray.models.trees import Trees
    if isinstance(model, Trees):
        return export_trees(model, n_features)

    class Head(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net(x))

    try:
        with _quiet():
            program = torch.onnx.export(
                Head(model).eval(), (torch.zeros(2, n_features),), dynamo=True,
                opset_version=OPSET, input_names=["features"], output_names=["probability"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as e:  # the exporter raises many types; all mean "not exportable"
        raise ExportError(f"torch.onnx could not export the network "
                          f"({type(model).__name__}): {str(e).splitlines()[0]}") from None
    if program is None:  # only with f=...; kept for the type checker
        raise ExportError("torch.onnx returned no program")
    return program.model_proto


def build(model: Any, pre: Any, threshold: float, *, doc: str = "",
          metadata: dict[str, str] | None = None) -> Any:
    """The whole graph (a ModelProto), checked with onnx.checker."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.compose import add_prefix

    columns = [*pre.numeric, *pre.categorical]
    bad = [c for c in columns if c in RESERVED or c.startswith(PREFIXES)]
    if bad:
        raise ExportError(f"column name(s) {bad} clash with the graph's own names "
                          f"({', '.join(RESERVED)}, or starting with {', '.join(PREFIXES)})")
    empty = [c for c in pre.categorical if "" in pre.categories[c]]
    if empty:  # "" is how the bundle spells a missing category
        raise ExportError(f"categorical column(s) {empty} have '' as a training category; the "
                          "bundle encodes missing values as ''")
    net = add_prefix(export_network(model, pre.n_features), "net/")
    (feat,), (prob,) = net.graph.input, net.graph.output

    nodes, inits, parts = [], [], []
    if pre.numeric:
        def const(name: str, values: dict[str, float]) -> str:
            inits.append(numpy_helper.from_array(
                np.array([[values[c] for c in pre.numeric]], dtype=np.float64), name))
            return name
        nodes += [
            helper.make_node("Concat", list(pre.numeric), ["pre/numeric"], axis=1),
            helper.make_node("IsNaN", ["pre/numeric"], ["pre/missing"]),
            helper.make_node("Where", ["pre/missing", const("pre/medians", pre.medians),
                                       "pre/numeric"], ["pre/imputed"]),
            helper.make_node("Sub", ["pre/imputed", const("pre/means", pre.means)],
                             ["pre/centred"]),
            helper.make_node("Div", ["pre/centred", const("pre/stds", pre.stds)],
                             ["pre/scaled64"]),
            helper.make_node("Cast", ["pre/scaled64"], ["pre/scaled"], to=TensorProto.FLOAT)]
        parts.append("pre/scaled")
    for i, c in enumerate(pre.categorical):
        cats = np.array([pre.categories[c]], dtype=object).reshape(1, -1)
        inits.append(numpy_helper.from_array(cats, f"pre/categories_{i}"))
        nodes += [helper.make_node("Equal", [c, f"pre/categories_{i}"], [f"pre/is_{i}"]),
                  helper.make_node("Cast", [f"pre/is_{i}"], [f"pre/onehot_{i}"],
                                   to=TensorProto.FLOAT)]
        parts.append(f"pre/onehot_{i}")
    nodes.append(helper.make_node("Concat", parts, [feat.name], axis=1))
    nodes += list(net.graph.node)
    inits += list(net.graph.initializer)
    inits.append(numpy_helper.from_array(np.array(float(threshold), dtype=np.float64),
                                         "post/threshold"))
    nodes += [helper.make_node("Identity", [prob.name], ["probability"]),
              helper.make_node("Cast", [prob.name], ["post/p64"], to=TensorProto.DOUBLE),
              helper.make_node("GreaterOrEqual", ["post/p64", "post/threshold"], ["post/ge"]),
              helper.make_node("Cast", ["post/ge"], ["label"], to=TensorProto.INT64)]

    out_shape = [d.dim_param or d.dim_value for d in prob.type.tensor_type.shape.dim]
    inputs = [helper.make_tensor_value_info(c, TensorProto.DOUBLE, ["N", 1]) for c in pre.numeric]
    inputs += [helper.make_tensor_value_info(c, TensorProto.STRING, ["N", 1])
               for c in pre.categorical]
    outputs = [helper.make_tensor_value_info("probability", TensorProto.FLOAT, out_shape),
               helper.make_tensor_value_info("label", TensorProto.INT64, out_shape)]
    graph = helper.make_graph(nodes, "mlops_ray_bundle", inputs, outputs, initializer=inits,
                              value_info=list(net.graph.value_info))
    full = helper.make_model(graph, opset_imports=list(net.opset_import),
                             functions=list(net.functions), producer_name="mlops_ray",
                             doc_string=doc)
    full.ir_version = net.ir_version
    helper.set_model_props(full, metadata or {})
    try:
        onnx.checker.check_model(full, full_check=True)
    except Exception as e:  # ValidationError / InferenceError: a broken graph is never written
        raise ExportError(f"the ONNX graph failed onnx.checker: {str(e).splitlines()[0]}"
                          ) from None
    return full


def feeds(inputs: list[Any], records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Session inputs + raw records -> the arrays the graph takes (what example.py does):
    numbers as float64 with NaN for missing or non-numbers, categories as strings, "" missing."""
    out: dict[str, np.ndarray] = {}
    for inp in inputs:
        values = [r.get(inp.name) for r in records]
        if inp.type == "tensor(string)":
            out[inp.name] = np.array([["" if v is None or v != v else str(v)] for v in values],
                                     dtype=object).reshape(-1, 1)
        else:
            out[inp.name] = np.array([[_number(v)] for v in values],
                                     dtype=np.float64).reshape(-1, 1)
    return out


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
