"""TensorRT engines (`model.plan`, what kapi's node serves on NVIDIA GPUs) built from an ONNX
model, at fp32, fp16 or int8, with a dynamic batch axis.

int8 comes two ways. Explicit quantization, TensorRT's own way since 10.1: the ONNX model
carries Q/DQ nodes (ONNX Runtime's static QDQ quantization, symmetric) and TensorRT builds it
as it stands, with no calibrator. Implicit quantization, deprecated in TensorRT 10.1 and gone
in 11: an fp32 model and a calibration set, through an IInt8EntropyCalibrator2 fed from torch's
CUDA memory. TensorRT 11 also drops the FP16 builder flag: there an fp16 engine is built from
the model converted to float16 (inputs and outputs kept fp32), strongly typed.

tensorrt is imported only inside functions, only where it is installed: without it, or
without a CUDA GPU, `build_engine` raises FailedPrecondition saying which (`available()`), so
that a variant can be marked "skipped: <reason>".
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.core.hardware import nvidia_gpu_ids

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
MAX_BATCH = 32  # the largest batch kapi's throughput measurement tries
CALIBRATION_BATCH = 32
WORKSPACE_BYTES = 4 << 30

Array = npt.NDArray[Any]


def available() -> str | None:
    """None where TensorRT can build engines here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if not nvidia_gpu_ids():
        return "no CUDA GPU"
    return None


def tensorrt_version() -> str | None:
    """TensorRT's version, None where it is not installed."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt as trt

    return str(trt.__version__)


def has_qdq(source: Path) -> bool:
    """Whether the ONNX model is explicitly quantized (holds QuantizeLinear/DequantizeLinear)."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    return any(node.op_type in QDQ_OPS for node in graph.node)


def qdq_problems(source: Path) -> list[str]:
    """What TensorRT refuses in an explicitly quantized ONNX model: it takes symmetric
    quantization only, every zero point 0 (ONNX Runtime's `ActivationSymmetric` and
    `WeightSymmetric` options). [] when there is nothing to refuse."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = node.attribute[0].t
    problems = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is None:
            problems.append(f"{node.name or node.op_type}: its zero point is not a constant")
        elif np.any(numpy_helper.to_array(zero_point) != 0):
            problems.append(f"{node.name or node.op_type}: zero point {node.input[2]} is not 0")
    return problems


def build_engine(
    source_onnx: Path,
    target_plan: Path,
    *,
    precision: str = "fp16",
    calibration: Array | None = None,
    max_batch: int = MAX_BATCH,
    opt_batch: int = 1,
    input_shape: tuple[int, ...] | None = None,
    sparse: bool = False,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> Path:
    """A TensorRT engine of `source_onnx` written to `target_plan` (returned).

    precision: "fp32"; "fp16"; "int8": from a Q/DQ model as it stands (no `calibration`), or
    from an fp32 model calibrated on `calibration` (preprocessed samples, [N, ...];
    TensorRT 10 only). The batch axis, where dynamic, takes 1 to `max_batch`, tuned for
    `opt_batch` (1: latency at batch 1, what kapi's budgets measure); `input_shape` (one
    sample's) fills the other dynamic axes. `sparse` lets TensorRT use 2:4 sparse kernels for
    weights that are 2:4 sparse (prune-2to4), on GPUs that have them (sm80 and later).

    FailedPrecondition (the variant is skipped, saying why) where TensorRT or a GPU is
    missing, or this TensorRT cannot parse or build the model at the precision asked for;
    InvalidArgument for arguments no TensorRT takes (an asymmetric Q/DQ model among them)."""
    reason = available()
    if reason is not None:
        raise FailedPrecondition(reason)
    import tensorrt as trt

    plan = _plan(trt, source_onnx, precision, calibration, max_batch, opt_batch, input_shape)
    with tempfile.TemporaryDirectory(prefix="kapi-trt-") as scratch:
        onnx_path = _fp16_onnx(source_onnx, Path(scratch)) if plan.convert_fp16 else source_onnx
        serialized = _build(trt, onnx_path, plan, sparse, workspace_bytes)
    target_plan.parent.mkdir(parents=True, exist_ok=True)
    target_plan.write_bytes(serialized)
    return target_plan


# --- what to build ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    precision: str
    strongly_typed: bool  # precision from the graph's types, not builder flags
    convert_fp16: bool  # build from the model converted to float16
    calibration: Array | None
    batches: tuple[int, int, int]  # min, opt, max
    input_shape: tuple[int, ...] | None


def _plan(
    trt: Any,
    source: Path,
    precision: str,
    calibration: Array | None,
    max_batch: int,
    opt_batch: int,
    input_shape: tuple[int, ...] | None,
) -> _Plan:
    if precision not in PRECISIONS:
        raise InvalidArgument(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if not 1 <= opt_batch <= max_batch:
        raise InvalidArgument(f"expected 1 <= opt_batch <= max_batch, got {opt_batch}, {max_batch}")
    weak = _weakly_typed(trt)
    explicit = has_qdq(source)
    if explicit and precision != "int8":
        raise InvalidArgument(f"{source.name} holds Q/DQ nodes: it builds at int8, not {precision}")
    if calibration is not None and (precision != "int8" or explicit):
        raise InvalidArgument("calibration is for int8 engines of fp32 models (no Q/DQ nodes)")
    if explicit:
        problems = qdq_problems(source)
        if problems:
            raise InvalidArgument(
                f"TensorRT takes symmetric Q/DQ only (zero points 0): {'; '.join(problems[:3])}"
                + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
            )
    elif precision == "int8":
        if calibration is None:
            raise InvalidArgument(
                f"{source.name} holds no Q/DQ nodes: an int8 engine needs a calibration set"
            )
        if not weak:
            raise FailedPrecondition(
                f"TensorRT {trt.__version__} has no implicit int8 calibration: build from a Q/DQ "
                "model (explicit quantization)"
            )
        if calibration.ndim < 2 or not len(calibration):
            raise InvalidArgument(f"the calibration set must be [N, ...], not {calibration.shape}")
    return _Plan(
        precision=precision,
        # Explicit quantization keeps the graph's precision; fp32 keeps fp32 (no TF32 guesses).
        strongly_typed=explicit or precision == "fp32" or not weak,
        convert_fp16=precision == "fp16" and not weak,
        calibration=calibration,
        batches=(1, opt_batch, max_batch),
        input_shape=input_shape,
    )


def _weakly_typed(trt: Any) -> bool:
    """Whether this TensorRT still has precision builder flags (10.x; removed in 11)."""
    return hasattr(trt.BuilderFlag, "FP16")


def _fp16_onnx(source: Path, folder: Path) -> Path:
    """`source` converted to float16, its inputs and outputs kept float32, as the fp16
    variant does (kapi.optimizer.plugins.convert_fp16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from kapi.optimizer.plugins import sort_nodes

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    sort_nodes(model.graph)
    path = folder / "model.fp16.onnx"
    onnx.save(model, str(path))
    return path


# --- building --------------------------------------------------------------------------------


def _build(trt: Any, source: Path, plan: _Plan, sparse: bool, workspace_bytes: int) -> bytes:
    logger = _logger(trt)
    logger.errors.clear()
    builder = _builder(trt, logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise FailedPrecondition(f"TensorRT cannot parse {source.name}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _set_precision(trt, config, plan)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = _profile(builder, network, plan.batches, plan.input_shape)
    if profile is not None:
        config.add_optimization_profile(profile)
    calibrator = None  # referenced until the build is done
    if plan.calibration is not None:
        calibrator = _set_calibrator(trt, builder, network, config, plan)
    serialized = builder.build_serialized_network(network, config)
    del calibrator
    if serialized is None:
        raise FailedPrecondition(
            f"TensorRT could not build {source.name} at {plan.precision}: "
            + ("; ".join(logger.errors) or "no error logged")
        )
    return bytes(memoryview(serialized))


def _builder(trt: Any, logger: Any) -> Any:
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as exc:  # no usable CUDA device after all
        raise FailedPrecondition(f"TensorRT cannot start on this GPU: {exc}") from exc
    if builder is None:  # pragma: no cover - older bindings return None
        raise FailedPrecondition("TensorRT cannot start on this GPU")
    return builder


def _network_flags(trt: Any, plan: _Plan) -> int:
    """Strong typing is the only kind in TensorRT 11, where the flag is deprecated: asked for
    on 10 only."""
    if plan.strongly_typed and _weakly_typed(trt):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _set_precision(trt: Any, config: Any, plan: _Plan) -> None:
    """TensorRT 10's builder flags, for a weakly typed network: fp16 kernels where faster;
    int8 with fp16 where a layer has no int8 kernel. Deprecated since 10.12, hence warned."""
    if plan.strongly_typed:
        return
    with _deprecated_apis():
        config.set_flag(trt.BuilderFlag.FP16)
        if plan.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)


def _profile(
    builder: Any, network: Any, batches: tuple[int, int, int], input_shape: tuple[int, ...] | None
) -> Any | None:
    """The shapes each dynamic input takes: the batch axis from `batches`, the others from
    `input_shape`; None where every input is static."""
    dynamic = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [tensor for tensor in dynamic if -1 in tuple(tensor.shape)]
    if not dynamic:
        return None
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        dims = tuple(tensor.shape)
        sample = _sample_shape(tensor.name, dims[1:], input_shape)
        shapes = [(dims[0] if dims[0] != -1 else batch, *sample) for batch in batches]
        profile.set_shape(tensor.name, *shapes)
    return profile


def _sample_shape(
    name: str, dims: tuple[int, ...], input_shape: tuple[int, ...] | None
) -> tuple[int, ...]:
    """One sample's shape: the network's, its dynamic axes filled from `input_shape`."""
    if input_shape is None:
        if -1 in dims:
            raise InvalidArgument(f"input {name!r} is {list(dims)} a sample: give input_shape")
        return dims
    fits = len(input_shape) == len(dims) and all(
        d in (-1, given) for d, given in zip(dims, input_shape, strict=True)
    )
    if not fits:
        raise InvalidArgument(f"input {name!r} is {list(dims)} a sample, not {list(input_shape)}")
    return tuple(input_shape)


# --- implicit int8 calibration (TensorRT 10) -------------------------------------------------


def _set_calibrator(trt: Any, builder: Any, network: Any, config: Any, plan: _Plan) -> Any:
    """An entropy calibrator on `plan.calibration`, with a calibration profile at its batch."""
    assert plan.calibration is not None
    if network.num_inputs != 1:
        raise InvalidArgument(f"calibration feeds one input; the model has {network.num_inputs}")
    tensor = network.get_input(0)
    dims = tuple(tensor.shape)
    batch = dims[0] if dims[0] != -1 else min(CALIBRATION_BATCH, plan.batches[2])
    batch = min(batch, len(plan.calibration))
    sample = _sample_shape(tensor.name, dims[1:], plan.input_shape)
    if tuple(plan.calibration.shape[1:]) != sample:
        raise InvalidArgument(
            f"the calibration samples are {list(plan.calibration.shape[1:])}, the model takes "
            f"{list(sample)}"
        )
    calibrator = _entropy_calibrator(trt, plan.calibration, batch)
    with _deprecated_apis():
        if -1 in dims:
            profile = builder.create_optimization_profile()
            shape = (batch, *sample)
            profile.set_shape(tensor.name, shape, shape, shape)
            config.set_calibration_profile(profile)
        config.int8_calibrator = calibrator
    return calibrator


def _entropy_calibrator(trt: Any, samples: Array, batch: int) -> Any:
    """TensorRT's IInt8EntropyCalibrator2, handed `batch` samples at a time from one CUDA
    buffer (torch's: every GPU image of kapi carries torch); a last partial batch is left
    out."""
    import torch

    if not torch.cuda.is_available():
        raise FailedPrecondition("int8 calibration needs torch with CUDA")
    host = np.ascontiguousarray(samples, dtype=np.float32)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.starts = iter(range(0, len(host) - batch + 1, batch))
            self.device = torch.empty((batch, *host.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            self.device.copy_(torch.from_numpy(host[start : start + batch]))  # synchronous
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    with _deprecated_apis():
        return EntropyCalibrator()


# --- TensorRT's side -------------------------------------------------------------------------


@functools.cache
def _logger(trt: Any) -> Any:
    """TensorRT's logger for this process (it must outlive every builder and parser that
    holds it): forwards to kapi's log, and keeps the errors of the build under way for its
    message."""
    severity = trt.ILogger.Severity

    class Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level: Any, message: str) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(message)
                log.error("TensorRT: %s", message)
            elif level == severity.WARNING:
                log.warning("TensorRT: %s", message)
            else:
                log.debug("TensorRT: %s", message)

    return Logger()


@contextmanager
def _deprecated_apis() -> Iterator[None]:
    """TensorRT 10's bindings warn (DeprecationWarning) on the weak-typing and calibration
    APIs they keep for 10.x; kapi uses them knowingly, only where the newer way is not there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
