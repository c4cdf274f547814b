"""TensorRT engines: where TensorRT or a GPU is missing, building says which, as the
FailedPrecondition a variant is skipped on; what each TensorRT is asked to build (builder
flags on 10, strong typing and an fp16 graph on 11, Q/DQ models as they stand); Q/DQ models
are recognized, and asymmetric ones, which TensorRT refuses, named. On a machine with
TensorRT and a GPU: real fp16, Q/DQ int8 and 2:4-sparse engines, served by kapi's node
runtime and answering what ONNX Runtime answers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
import pytest
import torch
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.node.runtimes import FILES, ModelFiles, runtime_class
from kapi.optimizer import tensorrt
from kapi.trainer import models
from kapi.trainer.bundle import export_onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from torch import nn

Array = npt.NDArray[Any]
REASON = tensorrt.available()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"TensorRT engines: {REASON}")
TRT_10 = SimpleNamespace(__version__="10.13.0", BuilderFlag=SimpleNamespace(FP16=1, INT8=2))
TRT_11 = SimpleNamespace(__version__="11.4.0", BuilderFlag=SimpleNamespace())


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Array]:
    """The zoo's small CNN, random weights (batch norm set from a batch), as ONNX; a batch of
    digits-shaped inputs."""
    torch.manual_seed(0)
    model = models.build("small_cnn", in_channels=1, num_classes=10)
    x = torch.randn(64, 1, 8, 8)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    path = tmp_path_factory.mktemp("cnn") / "model.onnx"
    export_onnx(model.eval(), [1, 8, 8], path)
    return path, x.numpy()


def _qdq(source: Path, target: Path, samples: Array, *, symmetric: bool) -> Path:
    """ONNX Runtime's static QDQ int8 model, as the ort-int8-static variant makes it; with
    symmetric activations (zero points 0) when `symmetric`."""

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"input": samples[i : i + 1]} for i in range(len(samples))])

        def get_next(self) -> dict[str, Array] | None:
            return next(self.batches, None)

    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    return target


def _onnxruntime(path: Path, x: Array) -> Array:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": x})[0])


# --- everywhere ------------------------------------------------------------------------------


@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are here")
@pytest.mark.parametrize("precision", ["fp16", "int8", "fp32"])
def test_without_tensorrt_or_a_gpu_building_says_why(
    cnn: tuple[Path, Array], tmp_path: Path, precision: str
) -> None:
    assert REASON in ("tensorrt is not installed", "no CUDA GPU")
    with pytest.raises(FailedPrecondition) as raised:
        tensorrt.build_engine(cnn[0], tmp_path / "model.plan", precision=precision)
    assert raised.value.message == REASON
    assert list(tmp_path.iterdir()) == []


def test_qdq_models_are_recognized_and_asymmetric_ones_named(
    cnn: tuple[Path, Array], tmp_path: Path
) -> None:
    source, x = cnn
    assert not tensorrt.has_qdq(source)
    assert tensorrt.qdq_problems(source) == []
    asymmetric = _qdq(source, tmp_path / "asymmetric.onnx", x[:16], symmetric=False)
    assert tensorrt.has_qdq(asymmetric)
    problems = tensorrt.qdq_problems(asymmetric)
    assert problems
    assert all("is not 0" in problem for problem in problems)
    symmetric = _qdq(source, tmp_path / "symmetric.onnx", x[:16], symmetric=True)
    assert tensorrt.has_qdq(symmetric)
    assert tensorrt.qdq_problems(symmetric) == []


def test_what_each_tensorrt_is_asked_to_build(cnn: tuple[Path, Array], tmp_path: Path) -> None:
    source, x = cnn
    qdq = _qdq(source, tmp_path / "qdq.onnx", x[:16], symmetric=True)
    plan = tensorrt._plan(TRT_10, source, "fp16", None, 32, 1, None)
    assert (plan.strongly_typed, plan.convert_fp16, plan.batches) == (False, False, (1, 1, 32))
    plan = tensorrt._plan(TRT_11, source, "fp16", None, 32, 8, None)
    assert (plan.strongly_typed, plan.convert_fp16, plan.batches) == (True, True, (1, 8, 32))
    for trt in (TRT_10, TRT_11):
        plan = tensorrt._plan(trt, qdq, "int8", None, 32, 1, None)
        assert (plan.strongly_typed, plan.convert_fp16, plan.calibration) == (True, False, None)
        assert tensorrt._plan(trt, source, "fp32", None, 32, 1, None).strongly_typed
    plan = tensorrt._plan(TRT_10, source, "int8", x, 32, 1, None)
    assert not plan.strongly_typed
    assert plan.calibration is x
    with pytest.raises(FailedPrecondition, match="no implicit int8 calibration"):
        tensorrt._plan(TRT_11, source, "int8", x, 32, 1, None)


@pytest.mark.parametrize(
    ("model", "precision", "calibration", "message"),
    [
        ("fp32", "bf16", False, "unknown precision"),
        ("fp32", "int8", False, "needs a calibration set"),
        ("fp32", "fp16", True, "calibration is for int8"),
        ("qdq", "fp16", False, "builds at int8"),
        ("qdq", "int8", True, "calibration is for int8"),
        ("asymmetric", "int8", False, "symmetric Q/DQ only"),
    ],
)
def test_what_no_tensorrt_builds_is_refused(
    cnn: tuple[Path, Array],
    tmp_path: Path,
    model: str,
    precision: str,
    calibration: bool,
    message: str,
) -> None:
    source, x = cnn
    if model != "fp32":
        source = _qdq(source, tmp_path / "q.onnx", x[:16], symmetric=model == "qdq")
    with pytest.raises(InvalidArgument, match=message):
        tensorrt._plan(TRT_10, source, precision, x if calibration else None, 32, 1, None)


def test_the_fp16_graph_for_tensorrt_11_keeps_fp32_inputs_and_answers(
    cnn: tuple[Path, Array], tmp_path: Path
) -> None:
    source, x = cnn
    converted = tensorrt._fp16_onnx(source, tmp_path)
    model = onnx.load(str(converted))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    expected = _onnxruntime(source, x)
    np.testing.assert_allclose(_onnxruntime(converted, x), expected, rtol=0.02, atol=0.02)


def test_batches_and_sample_shapes_must_fit(cnn: tuple[Path, Array]) -> None:
    with pytest.raises(InvalidArgument, match="opt_batch"):
        tensorrt._plan(TRT_10, cnn[0], "fp16", None, 8, 16, None)
    assert tensorrt._sample_shape("input", (1, 8, 8), None) == (1, 8, 8)
    assert tensorrt._sample_shape("input", (3, -1, -1), (3, 224, 224)) == (3, 224, 224)
    with pytest.raises(InvalidArgument, match="give input_shape"):
        tensorrt._sample_shape("input", (3, -1, -1), None)
    with pytest.raises(InvalidArgument, match="not \\[1, 8\\]"):
        tensorrt._sample_shape("input", (1, 8, 8), (1, 8))


# --- on a GPU with TensorRT ------------------------------------------------------------------


async def _served(plan: Path, x: Array) -> Array:
    """`x` through kapi's node runtime for `plan`, as a node serves the engine."""
    files = ModelFiles(plan.parent, plan.parent, plan.name, mc.ModelConfig(name="cnn"))
    runtime = runtime_class(FILES[plan.name])(files, 1)
    await runtime.load()
    try:
        inputs, _ = runtime.metadata()
        assert [(spec.name, spec.shape) for spec in inputs] == [("input", (-1, 1, 8, 8))]
        return np.asarray(runtime.infer({"input": x}, ["logits"])["logits"], np.float32)
    finally:
        await runtime.unload()


def _close(got: Array, expected: Array, tolerance: float) -> None:
    """Within `tolerance` of the largest logit."""
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= tolerance * scale


def _correlated(got: Array, expected: Array, at_least: float) -> None:
    """int8 against fp32 on random weights: the same logits, give or take the clipping."""
    assert got.shape == expected.shape
    assert float(np.corrcoef(got.ravel(), expected.ravel())[0, 1]) >= at_least


@needs_gpu
@pytest.mark.parametrize("sparse", [False, True])
async def test_an_fp16_engine_answers_what_onnxruntime_answers(
    cnn: tuple[Path, Array], tmp_path: Path, sparse: bool
) -> None:
    source, x = cnn
    plan = tensorrt.build_engine(source, tmp_path / "model.plan", precision="fp16", sparse=sparse)
    assert plan.stat().st_size > 0
    for batch in (1, 5, 32):
        _close(await _served(plan, x[:batch]), _onnxruntime(source, x[:batch]), 0.02)


@needs_gpu
async def test_a_qdq_int8_engine_answers_what_its_onnx_model_answers(
    cnn: tuple[Path, Array], tmp_path: Path
) -> None:
    source, x = cnn
    qdq = _qdq(source, tmp_path / "qdq.onnx", x, symmetric=True)
    plan = tensorrt.build_engine(qdq, tmp_path / "model.plan", precision="int8")
    served = await _served(plan, x[:8])
    _close(served, _onnxruntime(qdq, x[:8]), 0.1)
    _correlated(served, _onnxruntime(source, x[:8]), 0.9)


@needs_gpu
async def test_an_implicitly_calibrated_int8_engine_where_tensorrt_has_them(
    cnn: tuple[Path, Array], tmp_path: Path
) -> None:
    import tensorrt as trt

    if not hasattr(trt.BuilderFlag, "INT8"):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit int8 calibration")
    source, x = cnn
    plan = tensorrt.build_engine(source, tmp_path / "model.plan", precision="int8", calibration=x)
    _correlated(await _served(plan, x[:8]), _onnxruntime(source, x[:8]), 0.9)
