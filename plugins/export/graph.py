"""An `ExportNetwork` as an ONNX graph built from ONNX's own `RNN`, `LSTM` and `GRU` operators.

    inputs:  ids (batch, seq) int64; one (batch, H) float32 per state array, named as in the
             model's `init_state` (`h`, `c`, `h1`, ...)
    outputs: logits (batch, seq, V) float32; the state after the last step, `h_final`, ...

    OneHot(ids) -> Transpose to (seq, batch, V) -> per layer: RNN/LSTM/GRU (forward, initial
    state from the inputs) -> Squeeze the direction axis -> ... -> Transpose back -> MatMul Why,
    Add by

The ops run time-major (their default layout; onnxruntime runs no other). Float64 models are
written as float32. The vocabulary and encoding are kept in the model's metadata
(`charrnn.vocab` as JSON, `charrnn.encoding`), so a program can map text to ids without charrnn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from charrnn import __version__
from charrnn.files import atomic_write

from . import ExportError

if TYPE_CHECKING:
    import onnx

    from . import Source

OPSET = 17
IR_VERSION = 8  # the oldest IR that carries opset 17: readable by onnxruntime 1.12 and later
EXTRA = "pip install 'charrnn[onnx]'"


def require_onnx() -> None:
    """The `onnx` package, or an ExportError naming the extra that brings it."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError(f"writing .onnx needs the onnx package: {EXTRA}") from None


def build_graph(source: Source) -> onnx.ModelProto:
    """The ONNX model of `source`'s network, checked by `onnx.checker`."""
    require_onnx()
    from onnx import TensorProto, checker, helper, numpy_helper

    net = source.network
    V = net.by.shape[0]
    nodes, weights = [], []

    def const(name: str, value: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(value, name))
        return name

    def floats(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])]
    axis0, axis1 = const("axis0", np.array([0], np.int64)), const("axis1", np.array([1], np.int64))
    nodes.append(
        helper.make_node(
            "OneHot",
            ["ids", const("depth", np.array(V, np.int64)), const("off_on", np.array([0, 1], np.float32))],
            ["onehot"],
            axis=-1,
        )
    )  # (batch, seq, V)
    nodes.append(helper.make_node("Transpose", ["onehot"], ["x0"], perm=[1, 0, 2]))  # (seq, batch, V)
    x = "x0"
    for n, layer in enumerate(net.layers):
        H = layer.R.shape[1]
        W = const(f"W{n}", floats(layer.W)[None])  # (1, G, I): one direction
        R = const(f"R{n}", floats(layer.R)[None])  # (1, G, H)
        B = const(f"B{n}", floats(np.concatenate([layer.Wb, layer.Rb]))[None])  # (1, 2G)
        initial = []
        for name in layer.state:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", H]))
            outputs.append(helper.make_tensor_value_info(f"{name}_final", TensorProto.FLOAT, ["batch", H]))
            nodes.append(helper.make_node("Unsqueeze", [name, axis0], [f"{name}_initial"]))  # (1, batch, H)
            initial.append(f"{name}_initial")
        finals = [f"{name}_last" for name in layer.state]  # (1, batch, H) each
        attributes = {"hidden_size": H}
        if layer.op == "GRU":
            attributes["linear_before_reset"] = 1
        nodes.append(
            helper.make_node(layer.op, [x, W, R, B, "", *initial], [f"y{n}", *finals], **attributes)
        )  # y (seq, 1, batch, H)
        for name, last in zip(layer.state, finals, strict=True):
            nodes.append(helper.make_node("Squeeze", [last, axis0], [f"{name}_final"]))
        x = f"x{n + 1}"
        nodes.append(helper.make_node("Squeeze", [f"y{n}", axis1], [x]))  # (seq, batch, H)
    nodes.append(helper.make_node("Transpose", [x], ["top"], perm=[1, 0, 2]))  # (batch, seq, H)
    nodes.append(helper.make_node("MatMul", ["top", const("Why", floats(net.Why))], ["scores"]))
    nodes.append(helper.make_node("Add", ["scores", const("by", floats(net.by))], ["logits"]))
    graph = helper.make_graph(nodes, source.name, inputs, outputs, weights)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="charrnn",
        producer_version=__version__,
        doc_string=f"charrnn {source.summary()}; ids index charrnn.vocab",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "charrnn.model": source.model_type,
            "charrnn.vocab": json.dumps(source.vocab, ensure_ascii=False),
            "charrnn.encoding": source.encoding,
            "charrnn.state": json.dumps([s for layer in net.layers for s in layer.state]),
        },
    )
    checker.check_model(model)
    return model


def write_graph(source: Source, output: str | Path) -> int:
    """Write the ONNX graph of `source` to `output` (atomically); returns its size in bytes."""
    data = build_graph(source).SerializeToString()
    with atomic_write(output, "ONNX graph", ExportError) as f:
        f.write(data)
    return len(data)
