"""Builders for the small models the integration tests serve, and the repository layout.

Every model is built with onnx.helper (or exported from torch), saved in Triton's layout:
`<repository>/<model>/<version>/model.onnx` plus an optional `config.pbtxt`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# OIP datatype -> (ONNX element type, numpy dtype) for every datatype kapi serves.
DATATYPES: dict[str, tuple[int, npt.DTypeLike]] = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}
Dims = Sequence[int | str]


def graph_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[npt.NDArray[np.generic]] = (),
    initializer_names: Sequence[str] = (),
) -> onnx.ModelProto:
    """A checked ONNX model from its graph parts."""
    tensors = [
        numpy_helper.from_array(array, name)
        for array, name in zip(initializers, initializer_names, strict=True)
    ]
    graph = helper.make_graph(nodes, "graph", inputs, outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, elem_type: int, dims: Dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def identity_model(datatype: str, dims: Dims = ("batch", 4)) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0, for any datatype."""
    elem_type = DATATYPES[datatype][0]
    return graph_model(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [tensor("INPUT0", elem_type, dims)],
        [tensor("OUTPUT0", elem_type, dims)],
    )


def identity_bf16_model(dims: Dims = ("batch", 4)) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 in BF16 (apart from DATATYPES: tritonclient sends BF16 from FP32)."""
    return graph_model(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [tensor("INPUT0", TensorProto.BFLOAT16, dims)],
        [tensor("OUTPUT0", TensorProto.BFLOAT16, dims)],
    )


def add_constant_model(constant: float, dims: Dims = ("batch", 4)) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 + constant, in FP32: elementwise, so batching must not mix rows."""
    return graph_model(
        [helper.make_node("Add", ["INPUT0", "constant"], ["OUTPUT0"])],
        [tensor("INPUT0", TensorProto.FLOAT, dims)],
        [tensor("OUTPUT0", TensorProto.FLOAT, dims)],
        [np.array(constant, dtype=np.float32)],
        ["constant"],
    )


def add_sub_model() -> onnx.ModelProto:
    """Triton's `simple` model: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32)."""
    dims = ("batch", 16)
    return graph_model(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        [tensor("INPUT0", TensorProto.INT32, dims), tensor("INPUT1", TensorProto.INT32, dims)],
        [tensor("OUTPUT0", TensorProto.INT32, dims), tensor("OUTPUT1", TensorProto.INT32, dims)],
    )


def gather_model(table_size: int = 10) -> onnx.ModelProto:
    """OUTPUT0 = table[INDICES]: indices outside the table make ONNX Runtime fail."""
    return graph_model(
        [helper.make_node("Gather", ["table", "INDICES"], ["OUTPUT0"], axis=0)],
        [tensor("INDICES", TensorProto.INT64, ["batch", 2])],
        [tensor("OUTPUT0", TensorProto.FLOAT, ["batch", 2])],
        [np.arange(table_size, dtype=np.float32)],
        ["table"],
    )


def reshape_model() -> onnx.ModelProto:
    """OUTPUT0 = reshape(INPUT0, SHAPE): a SHAPE whose size differs makes the runtime fail."""
    return graph_model(
        [helper.make_node("Reshape", ["INPUT0", "SHAPE"], ["OUTPUT0"])],
        [tensor("INPUT0", TensorProto.FLOAT, [6]), tensor("SHAPE", TensorProto.INT64, [2])],
        [tensor("OUTPUT0", TensorProto.FLOAT, ["rows", "columns"])],
    )


def save_model(
    repository: Path,
    name: str,
    model: onnx.ModelProto | bytes,
    version: int = 1,
    config: str | None = None,
) -> Path:
    """Write one version of a model (and its config.pbtxt, when given); returns the model dir."""
    model_dir = repository / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (version_dir / "model.onnx").write_bytes(data)
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    return model_dir


class TinyCnn(torch.nn.Module):
    """A small classifier on 1x8x8 images: conv, ReLU, pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.linear = torch.nn.Linear(4 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.pool(torch.relu(self.conv(image))).flatten(1)
        logits: torch.Tensor = self.linear(features)
        return logits


def export_cnn(path: Path) -> TinyCnn:
    """A seeded TinyCnn, exported to ONNX at `path` with a dynamic batch dimension."""
    torch.manual_seed(0)
    model = TinyCnn().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The dev extras carry no onnxscript, so this is the TorchScript exporter, which
        # warns that it is deprecated; the warning is torch's, not kapi's.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return model


def convert_to_openvino(onnx_path: Path, xml_path: Path) -> None:
    """An OpenVINO IR (model.xml + model.bin) converted from an ONNX file, kept in FP32."""
    import openvino

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    openvino.save_model(
        openvino.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False
    )


def tile_model(repeats: int) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 repeated `repeats` times along its last axis (FP32): a small request
    with a large response."""
    return graph_model(
        [helper.make_node("Tile", ["INPUT0", "repeats"], ["OUTPUT0"])],
        [tensor("INPUT0", TensorProto.FLOAT, ["batch", "width"])],
        [tensor("OUTPUT0", TensorProto.FLOAT, ["batch", "tiled"])],
        [np.array([1, repeats], dtype=np.int64)],
        ["repeats"],
    )


def transpose_model() -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 transposed: both dimensions are dynamic, so it looks batchable, but
    its output's first dimension is the input's second, not the batch."""
    return graph_model(
        [helper.make_node("Transpose", ["INPUT0"], ["OUTPUT0"], perm=[1, 0])],
        [tensor("INPUT0", TensorProto.FLOAT, ["rows", "columns"])],
        [tensor("OUTPUT0", TensorProto.FLOAT, ["columns", "rows"])],
    )


def save_ensemble(repository: Path, name: str, config: str) -> Path:
    """An ensemble: its config and an empty version directory, as Triton lays one out."""
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def accumulator_model() -> onnx.ModelProto:
    """Triton QA's stateful accumulator, with implicit state: OUTPUT = READY * (INPUT + (START
    ? 0 : STATE_IN)), STATE_OUT = OUTPUT, CORR = CORRID; every tensor [batch, 1]."""
    rows = ["batch", 1]
    return graph_model(
        [
            helper.make_node("Sub", ["one", "START"], ["keep"]),
            helper.make_node("Mul", ["STATE_IN", "keep"], ["carried"]),
            helper.make_node("Add", ["carried", "INPUT"], ["sum"]),
            helper.make_node("Mul", ["sum", "READY"], ["OUTPUT"]),
            helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"]),
            helper.make_node("Identity", ["CORRID"], ["CORR"]),
        ],
        [
            tensor("INPUT", TensorProto.INT32, rows),
            tensor("START", TensorProto.INT32, rows),
            tensor("READY", TensorProto.INT32, rows),
            tensor("CORRID", TensorProto.UINT64, rows),
            tensor("STATE_IN", TensorProto.INT32, rows),
        ],
        [
            tensor("OUTPUT", TensorProto.INT32, rows),
            tensor("STATE_OUT", TensorProto.INT32, rows),
            tensor("CORR", TensorProto.UINT64, rows),
        ],
        [np.array(1, dtype=np.int32)],
        ["one"],
    )
