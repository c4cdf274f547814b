"""One loaded model version: its runtime and scheduler, and the path of a request through it
(check, decode, run, answer), with the in-flight count that unloading waits on."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import numpy as np

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.core.inference import EncodedTensor, InferenceRequest, InferenceResponse
from kapi.core.tensors import BytesCountError, Tensor, datatype_of, to_raw
from kapi.node.classification import classify
from kapi.node.config import Shapes
from kapi.node.runtimes import PLATFORM_OF, Arrays, Runtime
from kapi.node.scheduler import DynamicBatcher, InlineScheduler, Job, Scheduler
from kapi.node.sequences import SequenceBatcher, inner_batching
from kapi.node.stats import ModelStats
from kapi.node.validation import RequestValidator, bytes_count_error

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What runs a model's jobs: a scheduler over its runtime, or an ensemble's steps."""

    merges: bool

    async def submit(self, job: Job) -> Arrays: ...

    async def close(self) -> None: ...


# Inputs that take more decoding than this (BYTES, typed contents), and BYTES outputs that
# take more encoding, are converted off the event loop, so one large request cannot hold up
# health checks and other requests.
OFF_LOOP_BYTES = 256 * 1024
# How long unloading waits for the runtime's running executions and its own release.
RUNTIME_STOP_TIMEOUT_S = 30.0


class ModelVersion:
    """A model version that is loaded and serving."""

    def __init__(
        self,
        config: mc.ModelConfig,
        version: int,
        runtime_name: str,
        runtime: Runtime | None,
        stats: ModelStats,
        merges: bool = True,
        labels: dict[str, list[str]] | None = None,
        shapes: tuple[Shapes, Shapes] = ({}, {}),
        scheduler: Executor | None = None,
        inline: bool = False,
    ) -> None:
        """A model served by `runtime`, or (an ensemble) by `scheduler` alone."""
        self.config = config
        self.labels = labels or {}  # output -> class labels, for classification
        # Reshapes (after the batch dimension): inputs to the model's, outputs to the client's.
        self._to_model, self._to_client = shapes
        self._batching = config.max_batch_size > 0
        self.name = config.name
        self.version = version
        self.platform = PLATFORM_OF.get(runtime_name, runtime_name)
        self.runtime = runtime
        self.stats = stats
        self.validator = RequestValidator(config)
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        # inline: its executions are quick enough to run on the event loop
        self.scheduler: Executor = scheduler or self._make_scheduler(merges, inline)

    def _make_scheduler(self, merges: bool, inline: bool) -> Executor:
        assert self.runtime is not None  # only an ensemble has none, and its own scheduler
        if self.config.HasField("sequence_batching"):
            policy = inner_batching(self.config)
            if policy is None or not merges:
                inner: Scheduler = Scheduler(self.name, self.runtime, self.stats)
            else:
                inner = DynamicBatcher(
                    self.name, self.runtime, self.stats, self.config.max_batch_size, policy
                )
            return SequenceBatcher(self.config, inner)
        if not self.config.HasField("dynamic_batching"):
            if inline:
                return InlineScheduler(self.name, self.runtime, self.stats)
            return Scheduler(self.name, self.runtime, self.stats)
        policy = self.config.dynamic_batching
        if merges and self.config.max_batch_size > 0:
            return DynamicBatcher(
                self.name, self.runtime, self.stats, self.config.max_batch_size, policy
            )
        return Scheduler(self.name, self.runtime, self.stats, policy)

    async def infer(
        self,
        request: InferenceRequest,
        max_response_bytes: int = 0,
        in_shared_memory: frozenset[str] | set[str] = frozenset(),
    ) -> InferenceResponse:
        """Run one request. Outputs too large for a response of `max_response_bytes`
        (0: no limit) fail it with RESOURCE_EXHAUSTED, as the response could not be sent;
        outputs `in_shared_memory` go there, not in the response."""
        start = time.perf_counter_ns()
        self._in_flight += 1
        self._drained.clear()
        job: Job | None = None
        try:
            checked = self.validator.check(request)
            job = Job(
                inputs=await self._decode(checked.inputs),
                outputs=checked.outputs,
                batch_size=checked.batch_size,
                signature=checked.signature,
                future=asyncio.get_running_loop().create_future(),
                priority=checked.scheduling.priority,
                timeout_us=checked.scheduling.timeout_us,
                sequence=(
                    checked.scheduling.sequence_id,
                    checked.scheduling.sequence_start,
                    checked.scheduling.sequence_end,
                ),
            )
            outputs = await self.scheduler.submit(job)
            for name, shape in self._to_client.items():
                if name in outputs:
                    outputs[name] = self._reshape(name, outputs[name], shape)
            for name, count in checked.classifications.items():
                outputs[name] = classify(
                    outputs[name], count, self._batching, self.labels.get(name, [])
                )
            tensors = await self._encode([_tensor(name, outputs[name]) for name in job.outputs])
            if max_response_bytes:
                sent = [tensor for tensor in tensors if tensor.name not in in_shared_memory]
                self.validator.check_response_size(sent, max_response_bytes)
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
        return InferenceResponse(self.name, str(self.version), request.id, tensors)

    async def _encode(self, tensors: list[Tensor]) -> list[Tensor]:
        """Make the raw encoding of BYTES outputs (element by element), off the event loop
        when they are large; fixed-size outputs are one copy when the response is sent."""
        strings = [tensor for tensor in tensors if tensor.datatype == "BYTES"]
        if sum(tensor.encode_cost for tensor in strings) > OFF_LOOP_BYTES:
            await asyncio.to_thread(_encode_now, strings)
        else:
            _encode_now(strings)
        return tensors

    async def _decode(self, tensors: list[EncodedTensor]) -> Arrays:
        # A sequence's requests must reach its scheduler in their order: decoded on the loop.
        sequential = self.config.HasField("sequence_batching")
        if sum(tensor.decode_cost for tensor in tensors) > OFF_LOOP_BYTES and not sequential:
            return await asyncio.to_thread(self._decode_now, tensors)
        return self._decode_now(tensors)

    def _decode_now(self, tensors: list[EncodedTensor]) -> Arrays:
        """Decode and convert for the runtime; an input it cannot take fails this request."""
        try:
            arrays = {t.name: t.decode().data for t in tensors}
            for name, shape in self._to_model.items():
                if name in arrays:
                    arrays[name] = self._reshape(name, arrays[name], shape)
            if self.runtime is None:
                return arrays
            return {name: self.runtime.prepare_input(name, array) for name, array in arrays.items()}
        except BytesCountError as exc:  # Triton's words, then kapi's
            error = bytes_count_error(self.name, exc.name, exc.expected, exc.given)
            raise InvalidArgument(f"{error.message} ({exc.message})") from exc

    def _reshape(self, name: str, array: np.ndarray[Any, Any], shape: tuple[int, ...]) -> Any:
        """The config's reshape, after the batch dimension when the model batches."""
        target = (array.shape[0], *shape) if self._batching and array.ndim else shape
        try:
            return array.reshape(target)
        except ValueError as exc:
            raise InvalidArgument(
                f"model '{self.name}': tensor '{name}' of shape {list(array.shape)} cannot take "
                f"the config's reshape to {list(target)}: {exc}"
            ) from exc

    async def unload(self, drain_timeout_s: float) -> None:
        """Wait for in-flight requests (up to the timeout), then free the runtime, waiting
        at most RUNTIME_STOP_TIMEOUT_S for an execution that does not end."""
        try:
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
            except TimeoutError:
                log.warning("unloading with requests in flight", extra={"model": self.name})
            await asyncio.wait_for(self.scheduler.close(), RUNTIME_STOP_TIMEOUT_S)
            if self.runtime is not None:
                await asyncio.wait_for(self.runtime.unload(), RUNTIME_STOP_TIMEOUT_S)
        except TimeoutError:
            log.error(
                "the runtime did not stop in time; leaving it behind",
                extra={"model": self.name, "version": self.version},
            )
        finally:
            self.stats.close()


def _encode_now(tensors: list[Tensor]) -> None:
    for tensor in tensors:
        tensor.raw = to_raw(tensor)


def _tensor(name: str, array: np.ndarray[Any, Any]) -> Tensor:
    return Tensor(name, datatype_of(array), tuple(array.shape), array)
