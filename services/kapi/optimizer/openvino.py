"""OpenVINO variants of an ONNX model: its IR (`model.xml` + `model.bin`, the layout kapi's
node serves, `kapi.node.runtimes.FILES`) kept in fp32, and NNCF's post-training int8
quantization of it, with or without NNCF's accuracy control.

OpenVINO's CPU plugin computes an fp32 model in bf16 on CPUs with AVX-512 BF16 or AMX unless
told otherwise; `logits` asks for f32, as kapi's node does, so that what it returns is what
the node serves. NNCF's own accuracy checks compile in f32 too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core.errors import InvalidArgument, MissingExtra

IR_FILE = "model.xml"  # and model.bin beside it
PRESETS = ("performance", "mixed")  # symmetric weights; activations symmetric, or not
SUBSET_SIZE = 300  # NNCF's default number of calibration samples
BATCH = 256
# Operations NNCF quantizes whose weights, once quantized, are stored as int8 constants.
WEIGHTED_OPS = frozenset({"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"})
_LOW_PRECISION = frozenset({"i8", "u8", "i4", "u4"})
# What lies between an int8 weight constant and the operation that reads it.
_DECOMPRESSION = frozenset({"Convert", "Subtract", "Multiply", "Reshape", "Transpose"})

Array = npt.NDArray[Any]


def openvino_version() -> str:
    """OpenVINO's version string, e.g. "2025.1.0-18503-..."."""
    return str(_openvino().__version__)


def convert_ir(source: Path, target_dir: Path) -> Path:
    """`source` (ONNX) converted to an OpenVINO IR in `target_dir`, its weights kept in fp32;
    the path of its model.xml."""
    ov = _openvino()
    return _save(ov.convert_model(str(source)), target_dir)


def quantize_nncf(
    source: Path,
    target_dir: Path,
    calibration: Array,
    *,
    preset: str = "performance",
    subset_size: int = SUBSET_SIZE,
) -> Path:
    """`source` (ONNX) quantized to int8 by NNCF's post-training quantization, calibrated on
    `calibration` (preprocessed samples, [N, ...]; at most `subset_size` of them are used),
    saved as an IR in `target_dir`; the path of its model.xml."""
    nncf = _nncf()
    dataset = _calibration_dataset(nncf, calibration)
    options = {"preset": _preset(nncf, preset), "subset_size": _subset(subset_size, calibration)}
    model = _openvino().convert_model(str(source))
    with _nncf_output_to_stderr():
        quantized = nncf.quantize(model, dataset, **options)
    return _save(quantized, target_dir)


@dataclass(frozen=True)
class AccuracyControl:
    """What NNCF's accuracy control left: top-1 accuracy on the validation set before and
    after, and the weighted layers it kept in (or reverted to) fp32."""

    max_drop: float  # absolute, a fraction: 0.005 is half a point
    reference_accuracy: float
    quantized_accuracy: float
    samples: int
    int8_layers: int
    fp32_layers: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float:
        return self.reference_accuracy - self.quantized_accuracy

    @property
    def met(self) -> bool:
        return self.drop <= self.max_drop

    def __str__(self) -> str:
        verdict = "met" if self.met else "NOT met"
        layers = f"{len(self.fp32_layers)} of {self.int8_layers + len(self.fp32_layers)}"
        kept = f": {', '.join(self.fp32_layers)}" if self.fp32_layers else ""
        return (
            f"top-1 drop {self.drop:.4f} on {self.samples} val samples ({verdict}; fp32 "
            f"{self.reference_accuracy:.4f}, int8 {self.quantized_accuracy:.4f}), "
            f"{layers} weighted layers in fp32{kept}"
        )


def quantize_nncf_accuracy_control(
    source: Path,
    target_dir: Path,
    calibration: Array,
    validation_x: Array,
    validation_y: Array,
    max_drop: float,
    *,
    preset: str = "performance",
    subset_size: int = SUBSET_SIZE,
) -> tuple[Path, AccuracyControl]:
    """As `quantize_nncf`, then NNCF's accuracy control: the layers that cost the most top-1
    accuracy on (`validation_x`, `validation_y`) go back to fp32 until the absolute drop is
    at most `max_drop` (a fraction, as the requirements' accuracy.max_drop_vs_reference).
    Where no scope reaches it NNCF returns its best try, and the report says "NOT met"."""
    _check_validation(validation_x, validation_y, max_drop)
    nncf = _nncf()
    dataset = _calibration_dataset(nncf, calibration)
    options = {"preset": _preset(nncf, preset), "subset_size": _subset(subset_size, calibration)}
    pairs = list(zip(validation_x, validation_y, strict=True))
    model = _openvino().convert_model(str(source))
    reference = _accuracy(_compiled(model), validation_x, validation_y)
    with _nncf_output_to_stderr():
        quantized = nncf.quantize_with_accuracy_control(
            model,
            dataset,
            nncf.Dataset(pairs, _first_as_batch),
            _top1,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            **options,
        )
    path = _save(quantized, target_dir)
    int8, fp32 = weighted_layers(path)
    report = AccuracyControl(
        max_drop=max_drop,
        reference_accuracy=reference,
        quantized_accuracy=_accuracy(_compiled(quantized), validation_x, validation_y),
        samples=len(validation_y),
        int8_layers=len(int8),
        fp32_layers=fp32,
    )
    return path, report


def logits(model: Path, x: Array, *, batch: int = BATCH) -> Array:
    """The IR's output for the preprocessed batch `x` on the CPU in f32 (as kapi's node
    computes it), `batch` samples a call; the input and output are found by name: the only
    input, and the output named "logits" (or the only output)."""
    compiled = _compiled(_openvino().Core().read_model(str(model)))
    run = _runner(compiled)
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def op_types(model: Path) -> dict[str, int]:
    """How many operations of each type the IR holds (FakeQuantize marks an int8 model)."""
    counts: dict[str, int] = {}
    for op in _openvino().Core().read_model(str(model)).get_ops():
        counts[op.get_type_name()] = counts.get(op.get_type_name(), 0) + 1
    return counts


def weighted_layers(model: Path) -> tuple[list[str], list[str]]:
    """(int8, fp32): the names of the IR's convolutions and matrix products whose weights are
    stored in int8, and of those whose weights are not."""
    int8: list[str] = []
    fp32: list[str] = []
    for op in _openvino().Core().read_model(str(model)).get_ordered_ops():
        if op.get_type_name() in WEIGHTED_OPS:
            (int8 if _low_precision_weights(op) else fp32).append(op.get_friendly_name())
    return int8, fp32


# --- helpers ---------------------------------------------------------------------------------


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingExtra("openvino", "optimizer") from exc
    return openvino


def _nncf() -> Any:
    try:
        import nncf
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingExtra("nncf", "optimizer") from exc
    return nncf


def _save(model: Any, target_dir: Path) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / IR_FILE
    _openvino().save_model(model, str(path), compress_to_fp16=False)
    return path


def _compiled(model: Any) -> Any:
    """`model` compiled for the CPU in f32, on one stream."""
    properties = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1"}
    return _openvino().Core().compile_model(model, "CPU", properties)


def _runner(compiled: Any) -> Any:
    inputs = compiled.inputs
    if len(inputs) != 1:
        names = [port.any_name for port in inputs]
        raise InvalidArgument(f"the model takes {len(inputs)} inputs ({names}); expected one")
    outputs = {name: port for port in compiled.outputs for name in port.get_names()}
    output = outputs.get("logits", compiled.outputs[0])
    request = compiled.create_infer_request()
    name = inputs[0].any_name

    def run(x: Array) -> Array:
        return np.array(request.infer({name: x})[output], dtype=np.float32)

    return run


def _accuracy(compiled: Any, x: Array, y: Array) -> float:
    run = _runner(compiled)
    predicted = np.concatenate([run(x[i : i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])
    return float((predicted == y).mean())


def _first_as_batch(item: tuple[Array, Any]) -> Array:
    """A (sample, label) pair's model input: the sample as a batch of one."""
    return item[0][None]


def _top1(compiled: Any, items: Iterable[tuple[Array, Any]]) -> tuple[float, list[float]]:
    """NNCF's validation function: top-1 accuracy, and each item's hit (1.0) or miss (0.0),
    which lets NNCF rank layers by the samples they flip."""
    output = compiled.outputs[0]
    hits = [float(np.argmax(compiled(x[None])[output]) == label) for x, label in items]
    return (float(np.mean(hits)) if hits else 0.0), hits


def _calibration_dataset(nncf: Any, calibration: Array) -> Any:
    if calibration.ndim < 2 or not len(calibration):
        raise InvalidArgument(
            f"the calibration set must be [N, ...] with N > 0, not {list(calibration.shape)}"
        )
    samples = np.ascontiguousarray(calibration, dtype=np.float32)
    return nncf.Dataset(samples, lambda sample: sample[None])


def _preset(nncf: Any, preset: str) -> Any:
    if preset not in PRESETS:
        raise InvalidArgument(f"unknown NNCF preset {preset!r}; choose from {list(PRESETS)}")
    return nncf.QuantizationPreset(preset)


def _subset(subset_size: int, calibration: Array) -> int:
    if subset_size < 1:
        raise InvalidArgument(f"subset_size must be at least 1, not {subset_size}")
    return min(subset_size, len(calibration))


def _check_validation(x: Array, y: Array, max_drop: float) -> None:
    if not 0 <= max_drop < 1:
        raise InvalidArgument(f"max_drop is a fraction in [0, 1), not {max_drop}")
    if not len(x) or len(x) != len(y):
        raise InvalidArgument(
            f"accuracy control needs as many labels as samples, and some: {len(x)} samples, "
            f"{len(y)} labels"
        )


def _low_precision_weights(op: Any) -> bool:
    """Whether the op's weights (input 1) come from an int8 (or int4) constant, through the
    decompression NNCF writes, or through a FakeQuantize."""
    node = op.input_value(1).get_node()
    for _ in range(8):  # the chain is short: Convert, Subtract, Multiply, Reshape
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant":
            return node.get_element_type().get_type_name() in _LOW_PRECISION
        if kind not in _DECOMPRESSION:
            return False
        node = node.input_value(0).get_node()
    return False


@contextlib.contextmanager
def _nncf_output_to_stderr() -> Iterator[None]:
    """NNCF writes its log and progress bars to stdout, where `kapi optimize --json` writes
    its table: send them to stderr while it works. Its stdout handler is set aside (not
    flushed: the stream it holds may be gone) and one on stderr, alike, stands in."""
    logger = logging.getLogger("nncf")
    set_aside = [  # its stdout handler; not a FileHandler (nncf.set_log_file's)
        handler
        for handler in logger.handlers
        if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr
    ]
    stand_ins = [_on_stderr(handler) for handler in set_aside]
    for old, new in zip(set_aside, stand_ins, strict=True):
        logger.removeHandler(old)
        logger.addHandler(new)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # rich's progress bars
            yield
    finally:
        for old, new in zip(set_aside, stand_ins, strict=True):
            logger.removeHandler(new)
            logger.addHandler(old)


def _on_stderr(handler: logging.Handler) -> logging.Handler:
    stand_in = logging.StreamHandler(sys.stderr)
    stand_in.setLevel(handler.level)
    stand_in.setFormatter(handler.formatter)
    return stand_in
