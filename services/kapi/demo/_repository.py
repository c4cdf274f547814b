"""The demo's model repository: a small CNN as ONNX (with a Triton config and class labels)
and as OpenVINO IR (without), a BYTES echo model, an ensemble that preprocesses raw 8-bit
images for the CNN, a stateful counter for sequences, and a broken model for the hardening
stage."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the dev extra's packages, imported where they are used
    import onnx

CONFIG = """
name: "digits_onnx"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [{ name: "image", data_type: TYPE_FP32, dims: [1, 28, 28] }]
output [{ name: "logits", data_type: TYPE_FP32, dims: [10], label_filename: "labels.txt" }]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [{ count: 1, kind: KIND_CPU }]
"""
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Raw 8-bit images in, logits out: preprocessing, then the CNN, inside the node.
PIPELINE = """
platform: "ensemble"
max_batch_size: 16
input [{ name: "raw", data_type: TYPE_UINT8, dims: [28, 28] }]
output [{ name: "logits", data_type: TYPE_FP32, dims: [10], label_filename: "labels.txt" }]
ensemble_scheduling { step [
  { model_name: "digits_preprocess" input_map { key: "raw" value: "raw" }
    output_map { key: "image" value: "image" } },
  { model_name: "digits_onnx" input_map { key: "image" value: "image" }
    output_map { key: "logits" value: "logits" } }
] }
"""
# A running total per sequence, its state carried by the node between requests.
COUNTER = """
max_batch_size: 8
input [{ name: "INPUT", data_type: TYPE_INT32, dims: [1] }]
output [{ name: "OUTPUT", data_type: TYPE_INT32, dims: [1] }]
sequence_batching {
  oldest { max_queue_delay_microseconds: 1000 }
  control_input [
    { name: "START", control [{ kind: CONTROL_SEQUENCE_START, int32_false_true: [0, 1] }] },
    { name: "READY", control [{ kind: CONTROL_SEQUENCE_READY, int32_false_true: [0, 1] }] }
  ]
  state [{ input_name: "STATE_IN", output_name: "STATE_OUT", data_type: TYPE_INT32,
           dims: [1], initial_state { name: "zero", data_type: TYPE_INT32, dims: [1],
           zero_data: true } }]
}
"""
BROKEN = "classifier_zipmap"


def build_repository(root: Path) -> None:
    """Build it afresh at `root`."""
    import openvino as ov
    import torch
    from torch import nn

    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    ).eval()  # fmt: skip
    onnx_path = root / "digits_onnx" / "1" / "model.onnx"
    onnx_path.parent.mkdir(parents=True)
    with warnings.catch_warnings():  # the TorchScript exporter needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 28, 28),), str(onnx_path), input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    (root / "digits_onnx" / "config.pbtxt").write_text(CONFIG)
    labels = "\n".join(LABELS) + "\n"
    (root / "digits_onnx" / "labels.txt").write_text(labels)
    _save(root / "digits_preprocess" / "1" / "model.onnx", _preprocess())
    (root / "digits_pipeline" / "1").mkdir(parents=True)
    (root / "digits_pipeline" / "config.pbtxt").write_text(PIPELINE)
    (root / "digits_pipeline" / "labels.txt").write_text(labels)
    _save(root / "counter" / "1" / "model.onnx", _counter())
    (root / "counter" / "config.pbtxt").write_text(COUNTER)
    ir_path = root / "digits_openvino" / "1" / "model.xml"
    ir_path.parent.mkdir(parents=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(ir_path))
    _save(root / "text_echo" / "1" / "model.onnx", _text_echo())


def add_broken_model(root: Path) -> None:
    """What skl2onnx makes of a classifier by default: its probabilities are a sequence of
    maps (ZipMap), which no OIP tensor can carry."""
    _save(root / BROKEN / "1" / "model.onnx", _zipmap())


def remove_broken_model(root: Path) -> None:
    shutil.rmtree(root / BROKEN, ignore_errors=True)


def _text_echo() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "text_echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 4])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 4])],
    )
    return _model(graph, [helper.make_opsetid("", 17)])


def _preprocess() -> onnx.ModelProto:
    """uint8 [batch, 28, 28] -> float [batch, 1, 28, 28] in [0, 1]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["raw"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["wide", "scale"], ["scaled"]),
            helper.make_node("Unsqueeze", ["scaled", "axis"], ["image"]),
        ],
        "digits_preprocess",
        [helper.make_tensor_value_info("raw", TensorProto.UINT8, ["batch", 28, 28])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
        ],
    )
    return _model(graph, [helper.make_opsetid("", 17)])


def _counter() -> onnx.ModelProto:
    """OUTPUT = READY * (INPUT + (START ? 0 : STATE_IN)); STATE_OUT = OUTPUT."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rows: list[str | int] = ["batch", 1]
    tensors = [
        helper.make_tensor_value_info(name, TensorProto.INT32, rows)
        for name in ("INPUT", "START", "READY", "STATE_IN")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["one", "START"], ["keep"]),
            helper.make_node("Mul", ["STATE_IN", "keep"], ["carried"]),
            helper.make_node("Add", ["carried", "INPUT"], ["sum"]),
            helper.make_node("Mul", ["sum", "READY"], ["OUTPUT"]),
            helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"]),
        ],
        "counter",
        tensors,
        [
            helper.make_tensor_value_info("OUTPUT", TensorProto.INT32, rows),
            helper.make_tensor_value_info("STATE_OUT", TensorProto.INT32, rows),
        ],
        [numpy_helper.from_array(np.array(1, dtype=np.int32), "one")],
    )
    return _model(graph, [helper.make_opsetid("", 17)])


def _zipmap() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    sequence = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
        )
    )
    graph = helper.make_graph(
        [helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml",
                          classlabels_int64s=[0, 1, 2])],
        "classifier",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_value_info("probabilities", sequence)],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    return _model(graph, opsets)


def _model(graph: onnx.GraphProto, opsets: list[onnx.OperatorSetIdProto]) -> onnx.ModelProto:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _save(path: Path, model: onnx.ModelProto) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
