"""The optimizations, each a small plugin chosen by name. A variant is one plugin or a chain
of them joined by "+", model steps (on the PyTorch weights) before one graph step:

    prune-structured    channels removed (torch-pruning) at --prune-ratio, then fine-tuned
    prune-unstructured  the smallest weights zeroed at --prune-ratio, the layers kept dense
    prune-2to4          two of every four weights zeroed, for NVIDIA sparse tensor cores

    ort-int8-static     ONNX Runtime static int8, QDQ, per-channel weights, calibrated
                        (minmax, entropy or percentile) on the training split
    ort-int8-dynamic    ONNX Runtime dynamic int8 (weights int8, activations quantized at
                        run time): for linear and transformer-style models
    fp16                float16, inputs and outputs kept fp32
    openvino-fp32       OpenVINO IR
    openvino-int8       OpenVINO IR quantized by NNCF's post-training quantization;
                        with the spec's accuracy.max_drop_vs_reference, its accuracy control
    tensorrt-fp16       TensorRT engines, for NVIDIA profiles; skipped, saying why, where
    tensorrt-int8       there is no GPU or no tensorrt

e.g. `prune-structured+ort-int8-static`: pruned, fine-tuned, exported, then quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kapi.core.errors import InvalidArgument
from kapi.trainer.data.store import Dataset
from kapi.trainer.training import TrainConfig

log = logging.getLogger(__name__)

CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass
class Context:
    """What a plugin is given, and where it leaves its notes for the table."""

    dataset: Dataset
    calibration: str  # the method
    samples: np.ndarray[Any, Any]  # the calibration set, preprocessed
    validation: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None  # accuracy control
    max_drop: float | None = None  # the spec's accuracy.max_drop_vs_reference
    prune_ratio: float = 0.5
    fine_tune_epochs: int = 3
    config: TrainConfig | None = None  # the bundle's: fine-tuning uses its data and augmentation
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GraphStep:
    precision: str
    runtime: str
    build: Callable[[Path, Path, Context], Path]  # (fp32 ONNX, folder, context) -> artifact


@dataclass(frozen=True)
class ModelStep:
    build: Callable[[torch.nn.Module, Context], torch.nn.Module]


def quantize_int8_static(
    source: Path, folder: Path, context: Context, *, symmetric: bool = False
) -> Path:
    """`symmetric`: zero points of 0 everywhere, as TensorRT requires of a Q/DQ graph."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[context.calibration]
    samples = context.samples

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.next = 0

        def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
            if self.next == len(samples):
                return None
            self.next += 1
            return {"input": samples[self.next - 1 : self.next]}

    target, prepared = folder / "model.onnx", _prepared(source, folder)
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {},
    )
    prepared.unlink()
    return target


def quantize_int8_dynamic(source: Path, folder: Path, context: Context) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if any(node.op_type == "Conv" for node in onnx.load(str(source)).graph.node):
        note = (
            "ort-int8-dynamic on a CNN: ONNX Runtime runs dynamically quantized convolutions "
            "(ConvInteger) slower than fp32; use ort-int8-static for CNNs"
        )
        log.warning(note)
        context.notes.append(note)
    target, prepared = folder / "model.onnx", _prepared(source, folder)
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    prepared.unlink()
    return target


def _prepared(source: Path, folder: Path) -> Path:
    """Shapes inferred and the graph optimized, as ONNX Runtime asks before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / "prepared.onnx"
    quant_pre_process(str(source), str(prepared))
    return prepared


def convert_fp16(source: Path, folder: Path, context: Context) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    sort_nodes(model.graph)  # the converter appends its input casts after their readers
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def sort_nodes(graph: Any) -> None:
    """Order a graph's nodes so that each comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        runnable = [n for n in pending if all(name in ready for name in n.input)]
        if not runnable:
            raise InvalidArgument("the graph has a cycle or an input nothing produces")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        taken = {id(n) for n in runnable}
        pending = [n for n in pending if id(n) not in taken]
    del graph.node[:]
    graph.node.extend(ordered)


def openvino_fp32(source: Path, folder: Path, context: Context) -> Path:
    from kapi.optimizer.openvino import convert_ir

    return convert_ir(source, folder)


def openvino_int8(source: Path, folder: Path, context: Context) -> Path:
    from kapi.optimizer import openvino

    if context.max_drop is None:
        return openvino.quantize_nncf(source, folder, context.samples)
    if context.validation is None:
        raise InvalidArgument(
            f"NNCF's accuracy control judges on the val split; dataset '{context.dataset.name}' "
            "has none"
        )
    x, y = context.validation
    path, outcome = openvino.quantize_nncf_accuracy_control(
        source, folder, context.samples, x, y, context.max_drop
    )
    context.notes.append(f"NNCF accuracy control, max drop {context.max_drop:g}: {outcome}")
    return path


def tensorrt_engine(precision: str) -> Callable[[Path, Path, Context], Path]:
    def build(source: Path, folder: Path, context: Context) -> Path:
        from kapi.core.errors import FailedPrecondition
        from kapi.optimizer import tensorrt

        missing = tensorrt.available()
        if missing is not None:
            raise FailedPrecondition(missing)
        if precision == "int8":  # explicit quantization: TensorRT reads a symmetric Q/DQ graph
            source = quantize_int8_static(source, folder, context, symmetric=True)
        return tensorrt.build_engine(source, folder / "model.plan", precision=precision)

    return build


def prune_structured(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    from kapi.optimizer import pruning

    shape = context.dataset.preprocessing.input_shape(tuple(context.dataset.meta["sample_shape"]))
    pruned = pruning.prune_structured(model, torch.zeros(1, *shape), context.prune_ratio)
    config = context.config
    tuned = pruning.fine_tune(
        pruned,
        context.dataset,
        epochs=context.fine_tune_epochs,
        augment=config.augment if config else None,
        train_samples=config.train_samples if config else None,
        seed=config.seed if config else 0,
    )
    context.notes.append(pruning.summarize("structured", model, tuned).note())
    return tuned


def prune_unstructured(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    from kapi.optimizer import pruning

    pruned = pruning.prune_unstructured(model, context.prune_ratio)
    context.notes.append(pruning.summarize("unstructured", model, pruned).note())
    return pruned


def prune_2to4(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    from kapi.optimizer import pruning

    pruned = pruning.prune_2to4(model)
    context.notes.append(pruning.summarize("2:4", model, pruned).note())
    return pruned


GRAPH_STEPS: dict[str, GraphStep] = {
    "ort-int8-static": GraphStep("int8", "onnxruntime", quantize_int8_static),
    "ort-int8-dynamic": GraphStep("int8", "onnxruntime", quantize_int8_dynamic),
    "fp16": GraphStep("fp16", "onnxruntime", convert_fp16),
    "openvino-fp32": GraphStep("fp32", "openvino", openvino_fp32),
    "openvino-int8": GraphStep("int8", "openvino", openvino_int8),
    "tensorrt-fp16": GraphStep("fp16", "tensorrt", tensorrt_engine("fp16")),
    "tensorrt-int8": GraphStep("int8", "tensorrt", tensorrt_engine("int8")),
}
MODEL_STEPS: dict[str, ModelStep] = {
    "prune-structured": ModelStep(prune_structured),
    "prune-unstructured": ModelStep(prune_unstructured),
    "prune-2to4": ModelStep(prune_2to4),
}
NAMES = sorted(GRAPH_STEPS) + sorted(MODEL_STEPS)


@dataclass(frozen=True)
class Chain:
    name: str
    model_steps: list[tuple[str, ModelStep]]
    graph_step: GraphStep | None  # None: the fp32 ONNX export is the variant


def parse_chain(name: str) -> Chain:
    """`prune-structured+ort-int8-static` and the like; InvalidArgument naming the fault."""
    steps = [step.strip() for step in name.split("+")]
    unknown = [step for step in steps if step not in GRAPH_STEPS and step not in MODEL_STEPS]
    if unknown:
        raise InvalidArgument(f"unknown optimization(s) {unknown}; choose from {NAMES}")
    graph = [step for step in steps if step in GRAPH_STEPS]
    if len(graph) > 1 or (graph and steps[-1] != graph[0]):
        raise InvalidArgument(
            f"{name!r}: a variant takes pruning steps first, then at most one graph step "
            f"({sorted(GRAPH_STEPS)})"
        )
    return Chain(
        name,
        [(step, MODEL_STEPS[step]) for step in steps if step in MODEL_STEPS],
        GRAPH_STEPS[graph[0]] if graph else None,
    )
