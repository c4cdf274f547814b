"""Loading one model version: pick its runtime, load it, complete its config from the model,
and find out whether the model's outputs carry the batch dimension."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InternalError, InvalidArgument, KapiError
from kapi.core.tensors import NUMPY_DTYPES
from kapi.node.classification import read_labels
from kapi.node.config import (
    autocompletes_batching,
    check_tensor_types,
    choose_runtime,
    complete_config,
    complete_instance_groups,
    instance_count,
    model_shapes,
)
from kapi.node.ensemble import (
    ENSEMBLE,
    EnsembleScheduler,
    ModelLookup,
    check_composing,
    steps_of,
)
from kapi.node.model import ModelVersion
from kapi.node.runtimes import (
    PLATFORM_OF,
    Arrays,
    ModelFiles,
    Runtime,
    TensorSpec,
    runtime_class,
)
from kapi.node.scheduler import INLINE_NS
from kapi.node.stats import ModelStats, NodeMetrics

log = logging.getLogger(__name__)
# The batch the load-time probe runs: 2, as a batch of 1 cannot tell the batch dimension
# from a dimension that happens to be 1.
PROBE_BATCH = 2


async def load_version(
    model_dir: Path,
    version: int,
    config: mc.ModelConfig,
    metrics: NodeMetrics,
    default_max_batch_size: int,
) -> ModelVersion:
    """Bring one version up completely; on any failure nothing of it stays loaded."""
    config = _copy(config)
    version_dir = model_dir / str(version)
    runtime_name = choose_runtime(config, version_dir)
    runtime_cls = runtime_class(runtime_name)
    config.default_model_filename = config.default_model_filename or runtime_cls.default_filename
    complete_instance_groups(
        config, runtime_cls.default_kind(), runtime_cls.cpu_instance_count, runtime_cls.gpu_ids()
    )
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    unused = sorted(parameters.keys() - runtime_cls.parameters)
    if unused:
        log.warning(
            "model %r: kapi's %s runtime does not use parameters %s (it reads %s)",
            config.name, runtime_name, ", ".join(unused), ", ".join(sorted(runtime_cls.parameters)),
        )  # fmt: skip
    files = ModelFiles(model_dir, version_dir, config.default_model_filename, config, parameters)
    if not files.path.is_file():
        raise InvalidArgument(f"model '{config.name}' version {version}: {files.path} missing")
    runtime = runtime_cls(files, instance_count(config))
    await _load_runtime(runtime, config.name, version, runtime_name)
    try:
        inputs, outputs = runtime.metadata()
        check_tensor_types(config.name, inputs, outputs)
        merges = await _merges(runtime, config, inputs, outputs, default_max_batch_size)
        inline = await _runs_inline(runtime, config, inputs, outputs)
        complete_config(config, inputs, outputs, default_max_batch_size, merges)
        shapes = model_shapes(config, inputs, outputs)
        config.backend = config.backend or runtime_name
        config.platform = config.platform or PLATFORM_OF[runtime_name]
        labels = read_labels(model_dir, config)
        stats = ModelStats(metrics, config.name, str(version))
    except BaseException:
        await runtime.unload()
        raise
    return ModelVersion(
        config, version, runtime_name, runtime, stats, merges is not False, labels, shapes,
        inline=inline,
    )  # fmt: skip


def load_ensemble(
    model_dir: Path, version: int, config: mc.ModelConfig, metrics: NodeMetrics,
    lookup: ModelLookup,
) -> ModelVersion:  # fmt: skip
    """An ensemble version: its steps checked against the composing models loaded now."""
    config = _copy(config)
    steps = steps_of(config)
    check_composing(config, steps, lookup)
    labels = read_labels(model_dir, config)
    scheduler = EnsembleScheduler(config.name, steps, lookup)
    stats = ModelStats(metrics, config.name, str(version))
    return ModelVersion(config, version, ENSEMBLE, None, stats, labels=labels, scheduler=scheduler)


async def _load_runtime(runtime: Runtime, model: str, version: int, runtime_name: str) -> None:
    try:
        await runtime.load()
    except KapiError:
        raise
    except Exception as exc:
        raise InternalError(
            f"model '{model}' version {version}: {runtime_name} failed to load "
            f"{runtime.files.path.name}: {exc}"
        ) from exc


async def _merges(
    runtime: Runtime,
    config: mc.ModelConfig,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    default_max_batch_size: int,
) -> bool | None:
    """Whether requests to this model may be merged into one execution: True or False from
    a probe of PROBE_BATCH rows, None when no probe could tell (the scheduler then checks
    every batched execution). Only models that might batch are probed."""
    autocomplete = autocompletes_batching(config)
    max_batch = default_max_batch_size if autocomplete else config.max_batch_size
    if max_batch < PROBE_BATCH or not all(spec.shape[:1] == (-1,) for spec in inputs):
        return None
    if not autocomplete and not config.HasField("dynamic_batching"):
        return None
    merges = await asyncio.to_thread(_probe, runtime, inputs, outputs)
    if merges is False:
        log.warning(
            "model %r: its outputs do not keep the batch dimension first (a batch of %d rows "
            "gave other first dimensions), so its requests run one at a time",
            config.name,
            PROBE_BATCH,
        )
    return merges


async def _runs_inline(
    runtime: Runtime, config: mc.ModelConfig, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> bool:
    """Whether the model's requests run on the event loop (InlineScheduler): it schedules
    each request alone (no batcher, no sequences), its inputs have fixed sizes (so a probe
    tells what a request costs), and a probe of one row runs in under INLINE_NS."""
    scheduled = config.HasField("dynamic_batching") or config.HasField("sequence_batching")
    skip = 1 if config.max_batch_size > 0 else 0
    if scheduled or any(dim < 0 for spec in inputs for dim in spec.shape[skip:]):
        return False
    return await asyncio.to_thread(_fast, runtime, inputs, outputs, skip)


def _fast(runtime: Runtime, inputs: list[TensorSpec], outputs: list[TensorSpec], skip: int) -> bool:
    try:
        feed = {
            spec.name: runtime.prepare_input(spec.name, _neutral(spec, rows=1 if skip else 0))
            for spec in inputs
        }
        wanted = [spec.name for spec in outputs]
        fastest = min(_timed(runtime, feed, wanted) for _ in range(5))
    except Exception as exc:  # it cannot take neutral inputs: leave it on its threads
        log.debug("inline probe failed: %s", exc)
        return False
    log.info("execution probe: %d us (inline below %d)", fastest // 1000, INLINE_NS // 1000)
    return fastest < INLINE_NS


def _timed(runtime: Runtime, feed: Arrays, wanted: list[str]) -> int:
    start = time.perf_counter_ns()
    runtime.infer(feed, wanted)
    return time.perf_counter_ns() - start


def _probe(runtime: Runtime, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> bool | None:
    try:
        feed = {spec.name: runtime.prepare_input(spec.name, _neutral(spec)) for spec in inputs}
        results = runtime.infer(feed, [spec.name for spec in outputs])
        return all(np.shape(array)[:1] == (PROBE_BATCH,) for array in results.values())
    except Exception as exc:  # a model that cannot take neutral inputs; the scheduler checks
        log.debug("batch probe failed: %s", exc)
        return None


def _neutral(spec: TensorSpec, rows: int = PROBE_BATCH) -> npt.NDArray[np.generic]:
    """Zeros (empty strings) of the spec's shape: `rows` rows, or none (0) for a model
    without batching; variable dimensions 1."""
    dims = spec.shape[1:] if rows else spec.shape
    shape = (*((rows,) if rows else ()), *(dim if dim >= 0 else 1 for dim in dims))
    dtype = NUMPY_DTYPES[spec.datatype]
    return np.full(shape, b"", dtype) if dtype.kind == "O" else np.zeros(shape, dtype)


def _copy(config: mc.ModelConfig) -> mc.ModelConfig:
    copied = mc.ModelConfig()
    copied.CopyFrom(config)
    return copied
