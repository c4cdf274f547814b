"""Schedulers: how requests reach a runtime. Direct runs each request on its own; the
dynamic batcher merges queued requests into one execution and splits the results back."""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InternalError, KapiError, ResourceExhausted, Unavailable
from kapi.node.runtimes import Arrays, Runtime
from kapi.node.stats import ModelStats

Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(slots=True)
class Job:
    """One request waiting to run: its inputs, the outputs it wants, its batch size."""

    inputs: Arrays
    outputs: list[str]
    batch_size: int
    signature: Signature  # requests merge only when their non-batch shapes agree
    future: asyncio.Future[Arrays]
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    queue_ns: int = 0


class Scheduler(abc.ABC):
    def __init__(self, model: str, runtime: Runtime, stats: ModelStats, instances: int) -> None:
        self.model = model
        self.runtime = runtime
        self.stats = stats
        self._slots = asyncio.Semaphore(instances)

    @abc.abstractmethod
    async def submit(self, job: Job) -> Arrays:
        """Run the job (possibly with others) and return its outputs."""

    async def close(self) -> None:
        """Stop taking work; requests still queued fail with UNAVAILABLE."""

    async def _execute(self, jobs: list[Job]) -> None:
        """Run `jobs` as one execution and resolve each job's future with its own slice."""
        start = time.perf_counter_ns()
        for job in jobs:
            job.queue_ns = start - job.enqueued_ns
        try:
            inputs = _merge(jobs)
            wanted = list(dict.fromkeys(name for job in jobs for name in job.outputs))
            infer_start = time.perf_counter_ns()
            outputs = await self.runtime.infer(inputs, wanted)
            output_start = time.perf_counter_ns()
            _split(jobs, outputs)
        except Exception as exc:  # every waiting request learns why its execution failed
            error = (
                exc
                if isinstance(exc, KapiError)
                else InternalError(f"model '{self.model}': inference failed: {exc}")
            )
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        end = time.perf_counter_ns()
        self.stats.record_execution(
            sum(job.batch_size for job in jobs) or 1,
            len(jobs),
            infer_start - start,
            output_start - infer_start,
            end - output_start,
        )


class DirectScheduler(Scheduler):
    """No batching: each request is one execution. The runtime's thread pool (one thread per
    instance) bounds how many run at once; a slot taken here would leave the model idle
    while the event loop is busy decoding the next request."""

    async def submit(self, job: Job) -> Arrays:
        await self._execute([job])
        return await job.future


class DynamicBatcher(Scheduler):
    """Triton's dynamic batcher: queue, merge up to max_batch_size or the queue delay."""

    def __init__(
        self,
        model: str,
        runtime: Runtime,
        stats: ModelStats,
        instances: int,
        max_batch_size: int,
        policy: mc.ModelDynamicBatching,
    ) -> None:
        super().__init__(model, runtime, stats, instances)
        self._max = max_batch_size
        self._delay_s = policy.max_queue_delay_microseconds / 1e6
        self._preferred = frozenset(policy.preferred_batch_size)
        self._max_queue = policy.default_queue_policy.max_queue_size
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._carry: Job | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task = asyncio.create_task(self._batch_forever(), name=f"batcher:{model}")

    async def submit(self, job: Job) -> Arrays:
        if self._loop_task.done():
            raise Unavailable(f"model '{self.model}' is unloading")
        if self._max_queue and self._queue.qsize() >= self._max_queue:
            raise ResourceExhausted(
                f"model '{self.model}': queue is full ({self._max_queue} requests waiting)"
            )
        self._queue.put_nowait(job)
        return await job.future

    async def close(self) -> None:
        self._loop_task.cancel()
        await asyncio.gather(self._loop_task, *self._running, return_exceptions=True)
        pending = [self._carry] if self._carry else []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():  # its caller may have cancelled already
                job.future.set_exception(Unavailable(f"model '{self.model}' was unloaded"))

    async def _batch_forever(self) -> None:
        while True:
            # Take an instance first: while all are busy, requests pile up into bigger batches.
            await self._slots.acquire()
            try:
                batch = await self._gather()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._execute_then_release(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute_then_release(self, batch: list[Job]) -> None:
        try:
            await self._execute(batch)
        finally:
            self._slots.release()

    async def _gather(self) -> list[Job]:
        first, self._carry = self._carry or await self._queue.get(), None
        batch, size = [first], first.batch_size
        # As in Triton, the delay counts from the oldest request's arrival, not from now.
        waited_s = (time.perf_counter_ns() - first.enqueued_ns) / 1e9
        deadline = asyncio.get_running_loop().time() + self._delay_s - waited_s
        while size < self._max and size not in self._preferred:
            job = await self._next_before(deadline)
            if job is None:
                break
            if job.signature != first.signature or size + job.batch_size > self._max:
                self._carry = job
                break
            batch.append(job)
            size += job.batch_size
        return batch

    async def _next_before(self, deadline: float) -> Job | None:
        if not self._queue.empty():
            return self._queue.get_nowait()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            async with asyncio.timeout(remaining):
                return await self._queue.get()
        except TimeoutError:
            return None


def _merge(jobs: list[Job]) -> Arrays:
    if len(jobs) == 1:
        return jobs[0].inputs
    return {name: np.concatenate([job.inputs[name] for job in jobs]) for name in jobs[0].inputs}


def _split(jobs: list[Job], outputs: Arrays) -> None:
    if len(jobs) == 1:
        _resolve(jobs[0], outputs)
        return
    offset = 0
    for job in jobs:
        end = offset + job.batch_size
        _resolve(job, {name: outputs[name][offset:end] for name in job.outputs})
        offset = end


def _resolve(job: Job, outputs: Arrays) -> None:
    if not job.future.done():  # the caller may have gone away (cancelled RPC)
        job.future.set_result({name: outputs[name] for name in job.outputs})
