"""The optimizer's first stages: a trainer bundle exported again from its PyTorch weights,
simplified (onnxslim, then shape inference and onnx's checker) with its parity to PyTorch
recorded, and compressed by small plugins chosen by name:

    ort-int8-static   ONNX Runtime static int8, QDQ, per-channel weights, calibrated on the
                      dataset's training split with the stored preprocessing (minmax,
                      entropy or percentile)
    fp16              the float16 conversion of ONNX Runtime's tools, inputs and outputs
                      kept fp32

Every variant is measured on ONNX Runtime where it will run: accuracy on the test split,
latency at batch 1 (a fresh process, kapi.trainer.hpo.measure), size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.trainer.bundle import export_onnx
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.training import TrainConfig, build_model

CALIBRATIONS = ("minmax", "entropy", "percentile")
CALIBRATION_SAMPLES = 512
EVAL_BATCH = 256


@dataclass(frozen=True)
class Parity:
    max_abs_difference: float
    top1_agreement: float
    samples: int


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    path: str
    size_bytes: int
    accuracy: float
    top1_agreement: float  # with the fp32 ONNX model, on the test split
    latency_p50_ms: float
    latency_p95_ms: float


def load_bundle(bundle: Path, store: DatasetStore) -> tuple[torch.nn.Module, Dataset]:
    """The bundle's PyTorch model (its state dict in the zoo's architecture) and dataset."""
    try:
        lineage = json.loads((bundle / "lineage.json").read_text())
        state = torch.load(bundle / "state_dict.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"{bundle} is not a kapi bundle: {exc}") from exc
    dataset = store.get(lineage["dataset"]["name"], lineage["dataset"]["digest"])
    model = build_model(TrainConfig.model_validate(lineage["config"]), dataset)
    model.load_state_dict(state)
    return model.eval(), dataset


def export_simplified(model: torch.nn.Module, dataset: Dataset, path: Path) -> Parity:
    """ONNX (opset 17, dynamic batch), simplified and checked; its parity with PyTorch on the
    test split."""
    import onnx
    import onnxslim

    shape = dataset.preprocessing.input_shape(tuple(dataset.meta["sample_shape"]))
    raw = path.with_name(path.stem + ".raw.onnx")
    export_onnx(model, shape, raw)
    simplified = onnxslim.slim(str(raw))
    raw.unlink()
    simplified = onnx.shape_inference.infer_shapes(simplified, strict_mode=True)
    onnx.checker.check_model(simplified, full_check=True)
    onnx.save(simplified, str(path))
    x, _ = _test_split(dataset)
    with torch.no_grad():
        expected = np.concatenate(
            [
                model(torch.from_numpy(x[i : i + EVAL_BATCH])).numpy()
                for i in range(0, len(x), EVAL_BATCH)
            ]
        )
    got = _logits(path, x)
    return Parity(
        max_abs_difference=float(np.abs(got - expected).max()),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        samples=len(x),
    )


def quantize_int8_static(source: Path, target: Path, dataset: Dataset, calibration: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if calibration not in CALIBRATIONS:
        raise InvalidArgument(f"unknown calibration {calibration!r}; choose from {CALIBRATIONS}")
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calibration]
    samples = calibration_samples(dataset)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray[Any, Any]] = iter(
                samples[i : i + 1] for i in range(len(samples))
            )

        def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name("prepared.onnx")  # shapes inferred, graph optimized, as ORT asks
    quant_pre_process(str(source), str(prepared))
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
    )
    prepared.unlink()


def convert_fp16(source: Path, target: Path, dataset: Dataset, calibration: str) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    _sort_nodes(model.graph)  # the converter appends its input casts after their readers
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))


def _sort_nodes(graph: Any) -> None:
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


PLUGINS: dict[str, tuple[str, Callable[[Path, Path, Dataset, str], None]]] = {
    "ort-int8-static": ("int8", quantize_int8_static),
    "fp16": ("fp16", convert_fp16),
}


def calibration_samples(dataset: Dataset) -> np.ndarray[Any, Any]:
    """A seeded sample of the training split, preprocessed as at serving."""
    x, _ = dataset.split("train")
    if not len(x):
        raise FailedPrecondition(f"dataset '{dataset.name}' has no training split to calibrate on")
    chosen = np.random.default_rng(0).permutation(len(x))[:CALIBRATION_SAMPLES]
    return dataset.preprocessing.apply(x[np.sort(chosen)])


def build_variants(
    bundle: Path,
    store: DatasetStore,
    out: Path,
    *,
    plugins: list[str],
    calibration: str = "minmax",
    runs: int = 500,
) -> dict[str, Any]:
    """Every variant of `bundle` under `out` (written aside, renamed into place), with its
    table in `out/variants.json`."""
    from kapi.trainer.hpo.measure import measure

    unknown = sorted(set(plugins) - set(PLUGINS))
    if unknown:
        raise InvalidArgument(f"unknown optimization(s) {unknown}; choose from {sorted(PLUGINS)}")
    model, dataset = load_bundle(bundle, store)
    if out.exists():
        raise InvalidArgument(f"{out} exists already; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        reference = staging / "fp32" / "model.onnx"
        reference.parent.mkdir()
        parity = export_simplified(model, dataset, reference)
        x, y = _test_split(dataset)
        fp32_logits = _logits(reference, x)
        rows = [_row("fp32", "fp32", reference, fp32_logits, fp32_logits, y, runs, measure)]
        for name in plugins:
            precision, build = PLUGINS[name]
            target = staging / name / "model.onnx"
            target.parent.mkdir()
            build(reference, target, dataset, calibration)
            logits = _logits(target, x)
            rows.append(_row(name, precision, target, logits, fp32_logits, y, runs, measure))
        table = {
            "bundle": str(bundle),
            "parity": asdict(parity),
            "calibration": calibration,
            "variants": [
                asdict(r) | {"path": str(Path(r.path).relative_to(staging))} for r in rows
            ],
        }
        (staging / "variants.json").write_text(json.dumps(table, indent=2) + "\n")
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return table


def _row(
    name: str,
    precision: str,
    path: Path,
    logits: np.ndarray[Any, Any],
    reference: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    runs: int,
    measure: Any,
) -> Variant:
    timed = measure(path, "onnxruntime", runs=runs)
    return Variant(
        name=name,
        precision=precision,
        path=str(path),
        size_bytes=path.stat().st_size,
        accuracy=float((logits.argmax(1) == labels).mean()),
        top1_agreement=float((logits.argmax(1) == reference.argmax(1)).mean()),
        latency_p50_ms=timed.latency_p50_ms,
        latency_p95_ms=timed.latency_p95_ms,
    )


def _test_split(dataset: Dataset) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    x, y = dataset.split("test")
    if not len(x):
        raise FailedPrecondition(f"dataset '{dataset.name}' has no test split to judge on")
    return dataset.preprocessing.apply(x), y


def _logits(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run(["logits"], {"input": x[i : i + EVAL_BATCH]})[0]
            for i in range(0, len(x), EVAL_BATCH)
        ]
    )
