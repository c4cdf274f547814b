"""The demo's model repository: a small CNN as ONNX (with a Triton config) and as OpenVINO
IR (without), a BYTES echo model, and a broken model for the hardening stage."""

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
output [{ name: "logits", data_type: TYPE_FP32, dims: [10] }]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [{ count: 1, kind: KIND_CPU }]
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
