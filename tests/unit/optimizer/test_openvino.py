"""OpenVINO variants: the IR of an ONNX model answers what ONNX Runtime answers, and loads in
kapi's node as it serves it; NNCF's int8 IR of a small CNN trained on scikit-learn's digits
is a quarter of the size, quantized, and agrees with fp32; its accuracy control brings a
badly calibrated model back within the drop it is given, naming the layers it kept in fp32;
NNCF writes nothing to stdout; bad arguments are refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime
import pytest
import torch
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.node.runtimes import FILES, ModelFiles, runtime_class
from kapi.optimizer import openvino
from kapi.optimizer.pruning import fine_tune
from kapi.optimizer.source import calibration_samples, held_out, validation
from kapi.trainer import models
from kapi.trainer.bundle import export_onnx
from kapi.trainer.data.sources import open_source
from kapi.trainer.data.store import DatasetStore
from torch import nn

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Digits:
    onnx: Path
    calibration: Array
    val: tuple[Array, Array]
    test: tuple[Array, Array]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """A small CNN trained briefly on the digits (about 98% on test), exported to ONNX."""
    store = DatasetStore(tmp_path_factory.mktemp("data"))
    store.ingest("digits", open_source("sklearn-digits").load())
    dataset = store.get("digits")
    torch.manual_seed(0)
    model = models.build("small_cnn", in_channels=1, num_classes=10, width=0.5)
    model = fine_tune(model, dataset, epochs=6, seed=0)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export_onnx(model, [1, 8, 8], path)
    val = validation(dataset)
    assert val is not None
    return Digits(path, calibration_samples(dataset), val, held_out(dataset))


def _onnxruntime(path: Path, x: Array) -> Array:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": x})[0])


def _accuracy(logits: Array, labels: Array) -> float:
    return float((logits.argmax(1) == labels).mean())


def _random_resnet(path: Path) -> Array:
    """A small resnet18 with random weights (batch norm set from a batch, so that outputs
    differ), exported to `path`; a batch to run it on."""
    torch.manual_seed(0)
    model = models.build("resnet18", in_channels=3, num_classes=10, width=0.25, input_size=32)
    sample = torch.randn(8, 3, 32, 32)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(sample)
    export_onnx(model.eval(), [3, 32, 32], path)
    return sample.numpy()


def test_the_ir_answers_what_onnxruntime_answers(digits: Digits, tmp_path: Path) -> None:
    x, _ = digits.test
    xml = openvino.convert_ir(digits.onnx, tmp_path / "ir")
    assert xml == tmp_path / "ir" / "model.xml"
    assert (tmp_path / "ir" / "model.bin").is_file()
    assert FILES[xml.name] == "openvino"
    np.testing.assert_allclose(
        openvino.logits(xml, x, batch=64), _onnxruntime(digits.onnx, x), rtol=1e-4, atol=1e-4
    )
    assert openvino.weighted_layers(xml)[0] == []  # nothing in int8
    assert "FakeQuantize" not in openvino.op_types(xml)
    assert openvino.openvino_version()[:4].isdigit()


def test_a_deeper_model_converts_alike(tmp_path: Path) -> None:
    x = _random_resnet(tmp_path / "resnet.onnx")
    xml = openvino.convert_ir(tmp_path / "resnet.onnx", tmp_path / "ir")
    expected = _onnxruntime(tmp_path / "resnet.onnx", x)
    assert expected.std() > 1e-3  # outputs that differ, so the comparison means something
    np.testing.assert_allclose(openvino.logits(xml, x), expected, rtol=1e-4, atol=1e-4)


async def test_the_ir_loads_in_the_nodes_runtime(digits: Digits, tmp_path: Path) -> None:
    x, _ = digits.test
    xml = openvino.convert_ir(digits.onnx, tmp_path / "1")
    files = ModelFiles(tmp_path, xml.parent, xml.name, mc.ModelConfig(name="digits"))
    runtime = runtime_class(FILES[xml.name])(files, 1)
    await runtime.load()
    try:
        inputs, outputs = runtime.metadata()
        assert [(t.name, t.datatype, t.shape) for t in inputs] == [("input", "FP32", (-1, 1, 8, 8))]
        assert [(t.name, t.datatype, t.shape) for t in outputs] == [("logits", "FP32", (-1, 10))]
        served = np.asarray(runtime.infer({"input": x[:5]}, ["logits"])["logits"], np.float32)
    finally:
        await runtime.unload()
    np.testing.assert_allclose(served, _onnxruntime(digits.onnx, x[:5]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["performance", "mixed"])
def test_nncf_int8_is_smaller_quantized_and_agrees(
    digits: Digits, tmp_path: Path, preset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = digits.test
    fp32 = openvino.convert_ir(digits.onnx, tmp_path / "fp32")
    int8 = openvino.quantize_nncf(
        digits.onnx, tmp_path / "int8", digits.calibration, preset=preset, subset_size=200
    )
    assert capsys.readouterr().out == ""  # NNCF's log and progress went to stderr
    assert int8.name == "model.xml"
    ratio = int8.with_suffix(".bin").stat().st_size / fp32.with_suffix(".bin").stat().st_size
    assert ratio < 0.35  # int8 weights: a quarter, and the scales
    assert openvino.op_types(int8)["FakeQuantize"] >= 4  # the activations of each layer
    quantized, kept = openvino.weighted_layers(int8)
    assert len(quantized) == 4  # three convolutions and the classifier
    assert kept == []
    reference, got = openvino.logits(fp32, x), openvino.logits(int8, x)
    assert float((got.argmax(1) == reference.argmax(1)).mean()) >= 0.95
    assert abs(_accuracy(got, y) - _accuracy(reference, y)) <= 0.02


def test_accuracy_control_restores_a_badly_calibrated_model(digits: Digits, tmp_path: Path) -> None:
    """Calibrated on images at a twentieth of their scale, the int8 ranges clip nearly every
    activation: plain quantization is ruined, accuracy control reverts layers until the drop
    on val is within max_drop."""
    x, y = digits.val
    ruined = digits.calibration * 0.05
    reference = _accuracy(openvino.logits(openvino.convert_ir(digits.onnx, tmp_path / "a"), x), y)
    plain = openvino.quantize_nncf(digits.onnx, tmp_path / "b", ruined)
    assert _accuracy(openvino.logits(plain, x), y) < reference - 0.2
    max_drop = 0.01
    path, report = openvino.quantize_nncf_accuracy_control(
        digits.onnx, tmp_path / "c", ruined, x, y, max_drop
    )
    assert report.met
    assert (report.max_drop, report.samples) == (max_drop, len(y))
    assert report.reference_accuracy == pytest.approx(reference)
    got = _accuracy(openvino.logits(path, x), y)
    assert report.quantized_accuracy == pytest.approx(got)
    assert reference - got <= max_drop
    assert report.fp32_layers  # some layers went back to fp32 ...
    assert report.int8_layers >= 1  # ... not all of them
    assert report.fp32_layers == openvino.weighted_layers(path)[1]
    assert str(report).startswith(f"top-1 drop {report.drop:.4f} on {len(y)} val samples (met;")


def test_bad_arguments_are_refused(digits: Digits, tmp_path: Path) -> None:
    x, y = digits.val
    with pytest.raises(InvalidArgument, match="unknown NNCF preset"):
        openvino.quantize_nncf(digits.onnx, tmp_path, digits.calibration, preset="fast")
    with pytest.raises(InvalidArgument, match="calibration set"):
        openvino.quantize_nncf(digits.onnx, tmp_path, digits.calibration[:0])
    with pytest.raises(InvalidArgument, match="subset_size"):
        openvino.quantize_nncf(digits.onnx, tmp_path, digits.calibration, subset_size=0)
    with pytest.raises(InvalidArgument, match="max_drop is a fraction"):
        openvino.quantize_nncf_accuracy_control(
            digits.onnx, tmp_path, digits.calibration, x, y, 1.5
        )
    with pytest.raises(InvalidArgument, match="as many labels as samples"):
        openvino.quantize_nncf_accuracy_control(
            digits.onnx, tmp_path, digits.calibration, x, y[:-1], 0.01
        )
    assert list(tmp_path.iterdir()) == []
