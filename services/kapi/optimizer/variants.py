"""A source's variants, each built by its plugins (kapi.optimizer.plugins) and measured on
the runtime that will serve it: accuracy and top-1 agreement with fp32 on the test split,
latency p50/p95 at batch 1 on one thread and peak memory (a fresh process,
kapi.trainer.hpo.measure), throughput at the best batch with every core, size. With a
requirements spec every variant is verified too (kapi.verifier), its report beside it, and
the table marks those that fail.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.core.requirements import Requirements
from kapi.optimizer.plugins import CALIBRATIONS, Chain, Context, parse_chain
from kapi.optimizer.source import (
    Source,
    calibration_samples,
    export_simplified,
    held_out,
    simplify,
    validation,
)
from kapi.trainer.hpo.measure import best_throughput, measure, runtime_present
from kapi.verifier.artifact import Logits, open_artifact, runner

MEASURED_RUNTIMES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    runtime: str
    path: str  # relative to the variants folder; "" when skipped
    status: str  # "built", or "skipped: <why>"
    size_bytes: int = 0
    accuracy: float | None = None
    top1_agreement: float | None = None  # with the fp32 ONNX model, on the test split
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    peak_memory_mb: float | None = None
    throughput_rps: float | None = None
    throughput_batch: int | None = None
    verified: bool | None = None  # None: no requirements were given
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    calibration: str = "minmax"
    calibration_data: Path | None = None  # a .npy of raw images instead of the training split
    prune_ratio: float = 0.5
    fine_tune_epochs: int = 3
    requirements: Requirements | None = None
    profile: str | None = None  # the profile the variants are verified for
    runs: int = 500


def build_variants(
    source: Source, out: Path, plugins: list[str], options: Options = Options()
) -> dict[str, Any]:
    """Every variant of `source` under `out` (written aside, renamed into place), with its
    table in `out/variants.json`."""
    chains = [parse_chain(name) for name in plugins]
    _check(source, chains, options, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        table = _build(source, chains, options, staging)
        (staging / "variants.json").write_text(json.dumps(table, indent=2) + "\n")
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return table


def _check(source: Source, chains: list[Chain], options: Options, out: Path) -> None:
    if options.calibration not in CALIBRATIONS:
        raise InvalidArgument(
            f"unknown calibration {options.calibration!r}; choose from {CALIBRATIONS}"
        )
    if not 0 < options.prune_ratio < 1:
        raise InvalidArgument(f"--prune-ratio must lie in (0, 1), not {options.prune_ratio}")
    if source.model is None and any(chain.model_steps for chain in chains):
        raise InvalidArgument("pruning changes the PyTorch weights: give a bundle, not a model")
    if out.exists():
        raise InvalidArgument(f"{out} exists already; choose another --out")


@dataclass(frozen=True)
class _Judge:
    """What every variant is measured against: the test split and the fp32 model's logits."""

    staging: Path
    source: Source
    options: Options
    x: Any
    y: Any
    fp32: Logits
    reference: Path
    pruned: dict[tuple[str, ...], tuple[Any, list[str]]]  # by steps: the model, its notes


def _build(source: Source, chains: list[Chain], options: Options, staging: Path) -> dict[str, Any]:
    dataset = source.dataset
    reference = staging / "fp32" / "model.onnx"
    reference.parent.mkdir()
    parity = None
    if source.model is not None:
        parity = asdict(export_simplified(source.model, dataset, reference))
    else:
        assert source.onnx is not None
        simplify(source.onnx, reference)
    spec = options.requirements
    context = Context(
        dataset=dataset,
        calibration=options.calibration,
        samples=calibration_samples(dataset, options.calibration_data),
        validation=validation(dataset),
        max_drop=spec.accuracy.max_drop_vs_reference if spec and spec.accuracy else None,
        prune_ratio=options.prune_ratio,
        fine_tune_epochs=options.fine_tune_epochs,
        config=source.config,
    )
    _check_calibration(reference, context)
    x, y = held_out(dataset)
    fp32 = runner(open_artifact(reference))(x)
    judge = _Judge(staging, source, options, x, y, fp32, reference, {})
    rows = [_measure(judge, Variant("fp32", "fp32", "onnxruntime", "", "built"), reference)]
    rows += [_variant(judge, chain, context) for chain in chains]
    return {
        "source": str(source.path),
        "bundle": str(source.path) if source.model is not None else None,
        "dataset": {"name": dataset.name, "digest": dataset.digest},
        "parity": parity,
        "calibration": options.calibration,
        "calibration_data": str(options.calibration_data) if options.calibration_data else None,
        "variants": [asdict(row) for row in rows],
    }


def _check_calibration(reference: Path, context: Context) -> None:
    """The calibration set must be what the model takes (a wrong .npy is refused up front)."""
    try:
        runner(open_artifact(reference))(context.samples[:1])
    except Exception as exc:  # the runtime's own error: a shape or type it refuses
        shape = list(context.samples.shape[1:])
        raise InvalidArgument(
            f"the calibration set ({shape} a sample) does not fit the model: {exc}"
        ) from exc


def _variant(judge: _Judge, chain: Chain, context: Context) -> Variant:
    folder = judge.staging / chain.name
    folder.mkdir()
    context.notes = []
    start = judge.reference
    if chain.model_steps:
        model = _pruned(judge, chain, context)
        start = folder / "pruned.onnx"
        export_simplified(model, context.dataset, start)
    step = chain.graph_step
    if step is None:  # pruning alone: the pruned fp32 export is the variant
        row = Variant(chain.name, "fp32", "onnxruntime", "", "built", notes=context.notes)
        return _measure(judge, row, start.rename(folder / "model.onnx"))
    row = Variant(chain.name, step.precision, step.runtime, "", "built", notes=context.notes)
    try:
        artifact = step.build(start, folder, context)
    except FailedPrecondition as exc:  # TensorRT without a GPU, say
        shutil.rmtree(folder)
        return replace(row, status=f"skipped: {exc.message}")
    if start != judge.reference:
        start.unlink()
    return _measure(judge, row, artifact)


def _pruned(judge: _Judge, chain: Chain, context: Context) -> Any:
    """The chain's model steps applied to the bundle's model; each prefix of steps is run once
    a build (prune-structured, then prune-structured+ort-int8-static, prune and fine-tune once)."""
    assert judge.source.model is not None  # _check refused pruning without a bundle
    model, notes = judge.source.model, list(context.notes)
    names: tuple[str, ...] = ()
    for name, step in chain.model_steps:
        names += (name,)
        if names not in judge.pruned:
            context.notes = list(notes)
            judge.pruned[names] = (step.build(model, context), list(context.notes))
        model, notes = judge.pruned[names]
    context.notes = list(notes)
    return model


def _measure(judge: _Judge, row: Variant, path: Path) -> Variant:
    row = replace(row, path=str(path.relative_to(judge.staging)), size_bytes=path.stat().st_size)
    if row.runtime not in MEASURED_RUNTIMES or not runtime_present(row.runtime):
        return replace(row, notes=[*row.notes, f"{row.runtime} is not measured on this machine"])
    artifact = open_artifact(path)
    logits = runner(artifact)(judge.x)
    runs = judge.options.runs
    timed = measure(path, row.runtime, runs=runs)
    rps, batch = best_throughput(path, row.runtime, runs=runs)
    row = replace(
        row,
        size_bytes=artifact.size_bytes,
        accuracy=float((logits.argmax(1) == judge.y).mean()),
        top1_agreement=float((logits.argmax(1) == judge.fp32.argmax(1)).mean()),
        latency_p50_ms=timed.latency_p50_ms,
        latency_p95_ms=timed.latency_p95_ms,
        peak_memory_mb=timed.peak_memory_mb,
        throughput_rps=rps,
        throughput_batch=batch,
    )
    spec = judge.options.requirements
    if spec is None:
        return row
    from kapi.core.hardware import cpu_profiles
    from kapi.verifier.evidence import Holdout
    from kapi.verifier.report import verify, write_report

    profile = judge.options.profile or cpu_profiles()[0]
    report = verify(
        path,
        spec,
        Holdout.from_dataset(judge.source.dataset),
        profile=profile,
        reference=judge.reference,
        runs=runs,
    )
    write_report(report, path.parent)
    return replace(row, verified=report["passed"])
