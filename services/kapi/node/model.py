"""One loaded model version: its config, runtime and scheduler, and request validation."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InternalError, InvalidArgument, KapiError, ResourceExhausted
from kapi.core.inference import InferenceRequest, InferenceResponse
from kapi.core.tensors import Tensor, datatype_of, raw_size
from kapi.node.config import choose_runtime, complete_config, oip_datatype
from kapi.node.runtimes import PLATFORM_OF, Arrays, ModelFiles, Runtime, runtime_class
from kapi.node.scheduler import DynamicBatcher, Job, Scheduler
from kapi.node.stats import ModelStats, NodeMetrics

log = logging.getLogger(__name__)
# Room kept for the rest of a response message (names, shapes, parameters) around the
# outputs' raw bytes, so a response that passes the size check also fits the gRPC limit
# (at most half the limit, for a node configured with a tiny one).
RESPONSE_ENVELOPE_BYTES = 64 * 1024


class ModelVersion:
    """A model version that is loaded and serving."""

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        runtime_name: str,
        runtime: Runtime,
        stats: ModelStats,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.platform = PLATFORM_OF[runtime_name]
        self.runtime = runtime
        self.stats = stats
        self._inputs = {tensor.name: tensor for tensor in config.input}
        self._outputs = [tensor.name for tensor in config.output]
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self.scheduler = self._make_scheduler()

    @classmethod
    async def load(
        cls,
        model_dir: Path,
        version: int,
        config: mc.ModelConfig,
        metrics: NodeMetrics,
        default_max_batch_size: int,
    ) -> ModelVersion:
        config = _copy(config)
        version_dir = model_dir / str(version)
        runtime_name = choose_runtime(config, version_dir)
        runtime_cls = runtime_class(runtime_name)
        files = ModelFiles(
            model_dir,
            version_dir,
            config.default_model_filename or runtime_cls.default_filename,
            config,
            {key: value.string_value for key, value in config.parameters.items()},
        )
        if not files.path.exists():
            raise InvalidArgument(f"model '{config.name}' version {version}: {files.path} missing")
        instances = sum(group.count or 1 for group in config.instance_group) or 1
        runtime = runtime_cls(files, instances)
        try:
            await runtime.load()
        except KapiError:
            raise
        except Exception as exc:
            raise InternalError(
                f"model '{config.name}' version {version}: {runtime_name} failed to load "
                f"{files.path.name}: {exc}"
            ) from exc
        complete_config(config, *runtime.metadata(), default_max_batch_size)
        config.backend = config.backend or runtime_name
        config.platform = config.platform or PLATFORM_OF[runtime_name]
        stats = ModelStats(metrics, config.name, str(version))
        return cls(config, version, runtime_name, runtime, stats)

    def _make_scheduler(self) -> Scheduler:
        if self.config.max_batch_size > 0 and self.config.HasField("dynamic_batching"):
            return DynamicBatcher(
                self.name,
                self.runtime,
                self.stats,
                self.config.max_batch_size,
                self.config.dynamic_batching,
            )
        return Scheduler(self.name, self.runtime, self.stats)

    async def infer(
        self, request: InferenceRequest, max_response_bytes: int = 0
    ) -> InferenceResponse:
        """Run one request. Outputs too large for a response of `max_response_bytes`
        (0: no limit) fail it with RESOURCE_EXHAUSTED, as the response could not be sent."""
        start = time.perf_counter_ns()
        self._in_flight += 1
        self._drained.clear()
        job: Job | None = None
        try:
            job = self._make_job(request)
            outputs = await self.scheduler.submit(job)
            if max_response_bytes:
                self._check_response_size(outputs, job.outputs, max_response_bytes)
        except BaseException:
            self.stats.record_request(time.perf_counter_ns() - start, 0, False, 0)
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._drained.set()
        self.stats.record_request(
            time.perf_counter_ns() - start, job.queue_ns, True, job.batch_size or 1
        )
        tensors = [_tensor(name, outputs[name]) for name in job.outputs]
        return InferenceResponse(self.name, str(self.version), request.id, tensors)

    async def unload(self, drain_timeout_s: float) -> None:
        """Wait for in-flight requests (up to the timeout), then free the runtime."""
        try:
            await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
        except TimeoutError:
            log.warning("unloading with requests in flight", extra={"model": self.name})
        await self.scheduler.close()
        await self.runtime.unload()

    def _check_response_size(self, outputs: Arrays, names: list[str], limit: int) -> None:
        size = sum(raw_size(outputs[name]) for name in names)
        if size > limit - min(RESPONSE_ENVELOPE_BYTES, limit // 2):
            raise ResourceExhausted(
                f"model '{self.name}': the response's outputs take {size} bytes; with the "
                f"message around them that is over the node's message limit of {limit} bytes "
                f"(KAPI_NODE_MAX_MESSAGE_BYTES); request fewer rows or fewer outputs"
            )

    def _make_job(self, request: InferenceRequest) -> Job:
        batching = self.config.max_batch_size > 0
        given = {tensor.name: tensor for tensor in request.inputs}
        if len(given) != len(request.inputs):
            raise InvalidArgument(f"model '{self.name}': an input is given more than once")
        for name in given.keys() - self._inputs.keys():
            raise InvalidArgument(
                f"model '{self.name}' has no input '{name}', expected {sorted(self._inputs)}"
            )
        batch_sizes = set()
        for name, spec in self._inputs.items():
            tensor = given.get(name)
            if tensor is None:
                if spec.optional:
                    continue
                raise InvalidArgument(f"model '{self.name}': missing input '{name}'")
            batch_sizes.add(self._check_input(spec, tensor, batching))
        if len(batch_sizes) > 1:
            raise InvalidArgument(
                f"model '{self.name}': inputs disagree on batch size {sorted(batch_sizes)}"
            )
        outputs = request.requested_outputs or self._outputs
        for name in set(outputs) - set(self._outputs):
            raise InvalidArgument(
                f"model '{self.name}' has no output '{name}', expected {self._outputs}"
            )
        signature = tuple(
            (tensor.name, tensor.datatype, tensor.shape[1:]) for tensor in request.inputs
        )
        return Job(
            inputs={
                name: self.runtime.prepare_input(name, tensor.data)
                for name, tensor in given.items()
            },
            outputs=list(outputs),
            batch_size=batch_sizes.pop() if batching and batch_sizes else 0,
            signature=tuple(sorted(signature)),
            future=asyncio.get_running_loop().create_future(),
        )

    def _check_input(self, spec: mc.ModelInput, tensor: Tensor, batching: bool) -> int:
        expected_type = oip_datatype(spec.data_type)
        if tensor.datatype != expected_type:
            raise InvalidArgument(
                f"model '{self.name}': input '{tensor.name}' has datatype {tensor.datatype}, "
                f"expected {expected_type}"
            )
        dims = list(spec.dims)
        shape = list(tensor.shape)
        expected = ["batch", *dims] if batching else dims
        if batching:
            if not shape or not 1 <= shape[0] <= self.config.max_batch_size:
                raise InvalidArgument(
                    f"model '{self.name}': input '{tensor.name}' has shape {shape}; its first "
                    f"dimension is the batch, 1 to {self.config.max_batch_size}"
                )
            shape = shape[1:]
        if len(shape) != len(dims) or any(
            d not in (-1, s) for d, s in zip(dims, shape, strict=True)
        ):
            raise InvalidArgument(
                f"model '{self.name}': input '{tensor.name}' has shape {list(tensor.shape)}, "
                f"expected {expected} (-1: any size)"
            )
        return tensor.shape[0] if batching else 0


def _tensor(name: str, array: np.ndarray[Any, Any]) -> Tensor:
    return Tensor(name, datatype_of(array), tuple(array.shape), array)


def _copy(config: mc.ModelConfig) -> mc.ModelConfig:
    copied = mc.ModelConfig()
    copied.CopyFrom(config)
    return copied
