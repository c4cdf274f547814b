"""Schedulers: how requests reach a runtime, as in Triton. A model has one thread per instance;
each takes work from the model's queue and runs it on the runtime. The direct scheduler gives
an instance one request at a time; the dynamic batcher merges queued requests into one
execution and splits the results back.

The event loop only decodes a request, queues it and awaits its future. Forming a batch and
starting it happen on the instance's own thread, so an instance starts its next execution the
moment its last one ends, however busy the loop is; the results of an execution reach the
loop in one callback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InternalError, KapiError, Unavailable
from kapi.node.queues import JobQueue
from kapi.node.runtimes import Arrays, Runtime, in_daemon_thread
from kapi.node.stats import ModelStats

log = logging.getLogger(__name__)
# A model whose executions take less than this at load runs on the event loop (the hand-off
# to an instance thread and back costs about as much); one whose executions average past
# SLOW_INLINE_NS, once serving, goes back to its threads.
INLINE_NS = 100_000
SLOW_INLINE_NS = 1_000_000
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(slots=True, eq=False)  # a job is itself: queues find and remove it by identity
class Job:
    """One request waiting to run: its inputs, the outputs it wants, its batch size."""

    inputs: Arrays
    outputs: list[str]
    batch_size: int
    signature: Signature  # requests merge only when their non-batch shapes agree
    future: asyncio.Future[Arrays]
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    queue_ns: int = 0
    priority: int = 0  # the request's `priority` parameter (0: the default level)
    timeout_us: int = 0  # the request's `timeout` parameter (0: the policy's)
    level: int = 0  # its priority level, once queued
    delayed: bool = False  # its wait timed out under a DELAY policy
    sequence: tuple[int | str, bool, bool] = (0, False, False)  # id, start, end
    forming: bool = False  # it is in a batch an instance is forming
    expired: bool = False  # its wait timed out while its batch formed


@dataclass(frozen=True, slots=True)
class _Execution:
    """What an instance thread hands back to the loop: a batch and its outcome."""

    jobs: list[Job]
    outputs: list[Arrays] | None  # one per job; None when the execution failed
    error: KapiError | None
    input_ns: int
    infer_ns: int
    output_ns: int


class Scheduler:
    """The direct scheduler: each request is one execution on the next free instance.
    There is one instance thread for each of the runtime's instances."""

    def __init__(
        self,
        model: str,
        runtime: Runtime,
        stats: ModelStats,
        policy: mc.ModelDynamicBatching | None = None,
    ) -> None:
        self.model = model
        self.runtime = runtime
        self.stats = stats
        self._loop = asyncio.get_running_loop()
        # Priority levels and queue policies come with dynamic_batching, as in Triton.
        self._queue: JobQueue[Job] = JobQueue(policy)
        self._ready = threading.Condition()  # guards _queue and _closed
        self._closed = False
        self.merges = True  # whether requests may share an execution (dynamic batching)
        self._threads = [
            threading.Thread(target=self._serve, name=f"{model}:{index}", daemon=True)
            for index in range(max(runtime.instances, 1))
        ]
        for thread in self._threads:
            thread.start()

    async def submit(self, job: Job) -> Arrays:
        """Queue the job at its priority level; its outputs come back once an instance has
        run it, or an error once its wait times out under a REJECT policy."""
        with self._ready:
            if self._closed:
                raise Unavailable(f"model '{self.model}' is unloading")
            job.level = self._queue.level_of(job.priority)
            if self._queue.full(job.level):
                self._drop_abandoned()
                if limit := self._queue.full(job.level):  # Triton's status and words
                    raise Unavailable(
                        f"model '{self.model}': exceeds maximum queue size ({limit} requests "
                        "waiting)"
                    )
            self._queue.append(job)
            self._ready.notify()
        timeout_us = self._queue.timeout_us(job.level, job.timeout_us)
        if timeout_us:
            timer = self._loop.call_later(timeout_us / 1e6, self._timed_out, job)
            job.future.add_done_callback(lambda _: timer.cancel())
        return await job.future

    def _timed_out(self, job: Job) -> None:
        """A job that waited its timeout: failed (REJECT) or moved back (DELAY) if it is
        still queued, or marked for the batch it is in to deal with; once running, it runs."""
        with self._ready:
            if job.delayed:
                return
            if job.forming:
                job.expired = True
                self._ready.notify_all()
                return
            if job not in self._queue:
                return
            if self._queue.policy(job.level).timeout_action == mc.ModelQueuePolicy.DELAY:
                self._queue.delay(job)
                return
            self._queue.remove(job)
        if not job.future.done():
            job.future.set_exception(self._timeout_error())

    def _timeout_error(self) -> Unavailable:
        return Unavailable(f"model '{self.model}': Request timeout expired")  # Triton's words

    async def close(self) -> None:
        """Stop taking work: requests still queued fail with UNAVAILABLE at once; then wait
        for the executions running (a batch being formed runs with what it has)."""
        self._deliver(self._stop_taking())
        await in_daemon_thread(self._join)

    def _stop_taking(self) -> _Execution:
        """Close the queue; what was in it, as a failed execution to deliver."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
            queued = self._queue.clear()
        error = Unavailable(f"model '{self.model}' was unloaded")
        return _Execution(queued, None, error, 0, 0, 0)

    def _drop_abandoned(self) -> None:
        """Forget queued requests whose caller gave up. Holds _ready."""
        self._queue.keep([job for job in self._queue if not job.future.done()])

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _to_loop(self, execution: _Execution) -> bool:
        """Deliver from an instance thread; False when the loop is closed."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, execution)
        except RuntimeError:
            return False
        return True

    # Everything below runs on the instance threads.

    def _serve(self) -> None:
        jobs: list[Job] | None = []
        try:
            while (jobs := self._take()) is not None:
                if not self._execute(jobs):
                    self._stop_taking()  # the loop is closed: nobody waits any more
                jobs = []
        except BaseException:  # a bug: fail what waits rather than let it hang
            log.exception(
                "instance thread failed; the model takes no more requests",
                extra={"model": self.model},
            )
            queued = self._stop_taking()
            error = InternalError(f"model '{self.model}': its instance failed; see the log")
            self._to_loop(_Execution([*(jobs or []), *queued.jobs], None, error, 0, 0, 0))

    def _take(self) -> list[Job] | None:
        with self._ready:
            job = self._first()
            return None if job is None else [job]

    def _stop_merging(self, reason: str) -> None:
        """Run each request alone from now on: the model's outputs do not keep the batch."""
        if self.merges:
            self.merges = False
            log.warning(
                "the model's outputs do not keep the batch dimension first: its requests run "
                "one at a time from now on (%s)",
                reason,
                extra={"model": self.model},
            )

    def _first(self) -> Job | None:
        """The oldest job still wanted, waiting for one; None once closed (close fails what is
        still queued). Holds _ready."""
        while not self._closed:
            while self._queue:
                job = self._queue.popleft()
                if not job.future.done():  # skip requests whose caller gave up while queued
                    return job
            self._ready.wait()
        return None

    def _execute(self, jobs: list[Job]) -> bool:
        """Run `jobs` as one execution; hand the results to the loop in one callback.
        False when the loop is closed."""
        jobs = [job for job in jobs if not job.future.done()]  # callers gone while batching
        if not jobs:
            return True
        start = time.perf_counter_ns()
        for job in jobs:
            job.queue_ns = start - job.enqueued_ns
        infer_start = output_start = start
        outputs: list[Arrays] | None = None
        error: KapiError | None = None
        try:
            inputs = _merge(jobs)
            wanted = list(dict.fromkeys(name for job in jobs for name in job.outputs))
            infer_start = time.perf_counter_ns()
            results = self.runtime.infer(inputs, wanted)
            output_start = time.perf_counter_ns()
            outputs = _split(jobs, results)
        except _NotBatched as exc:  # the probe at load could not tell; now we know
            self._stop_merging(str(exc))
            return all([self._execute([job]) for job in jobs])
        except BaseException as exc:  # every request of the execution learns why it failed
            error = (
                exc
                if isinstance(exc, KapiError)
                else InternalError(f"model '{self.model}': inference failed: {exc}")
            )
        end = time.perf_counter_ns()
        execution = _Execution(
            jobs,
            outputs,
            error,
            infer_start - start,
            output_start - infer_start,
            end - output_start,
        )
        return self._to_loop(execution)

    # Back on the event loop.

    def _deliver(self, execution: _Execution) -> None:
        jobs = execution.jobs
        if execution.outputs is None:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(execution.error or InternalError("no outputs"))
            return
        for job, outputs in zip(jobs, execution.outputs, strict=True):
            if not job.future.done():  # the caller may have gone away (cancelled RPC)
                job.future.set_result(outputs)
        self.stats.record_execution(
            sum(job.batch_size for job in jobs) or 1,
            len(jobs),
            execution.input_ns,
            execution.infer_ns,
            execution.output_ns,
        )


class InlineScheduler(Scheduler):
    """The direct scheduler for a model whose executions take microseconds: each request
    runs on the event loop itself, as handing it to an instance thread and back costs more
    than running it. A model that turns out slower (its executions' moving average past
    SLOW_INLINE_NS: one execution the OS happened to preempt does not count) goes to its
    instance threads from then on."""

    def __init__(self, model: str, runtime: Runtime, stats: ModelStats) -> None:
        super().__init__(model, runtime, stats)
        self.inline = True
        self._average_ns = 0.0

    async def submit(self, job: Job) -> Arrays:
        if not self.inline or self._closed:
            return await super().submit(job)
        start = time.perf_counter_ns()
        job.queue_ns = start - job.enqueued_ns
        try:
            results = self.runtime.infer(job.inputs, job.outputs)
        except KapiError:
            raise
        except Exception as exc:
            raise InternalError(f"model '{self.model}': inference failed: {exc}") from exc
        elapsed = time.perf_counter_ns() - start
        self.stats.record_execution(job.batch_size or 1, 1, 0, elapsed, 0)
        self._average_ns += (elapsed - self._average_ns) * 0.1
        if self._average_ns > SLOW_INLINE_NS:
            self.inline = False
            log.info(
                "model executions take longer than expected; they run on instance threads",
                extra={"model": self.model, "execution_us": elapsed // 1000},
            )
        return {name: results[name] for name in job.outputs}


class DynamicBatcher(Scheduler):
    """Triton's dynamic batcher (core `dynamic_batch_scheduler.cc`): a free instance
    scans the queue in order and merges requests while they fit, then
    - runs the largest preferred size it found, unless the oldest request has waited out
      the queue delay (then it runs all it took);
    - marks the batch where the next request would pass the largest preferred size, and
      runs that if nothing larger is preferred;
    - runs at once when the next request would pass max_batch_size or differs in shape,
      when the batch reached the largest preferred size, or when the delay is 0 or over;
    - otherwise waits for more requests, up to the delay counted from the oldest request.
    Without preferred sizes, max_batch_size is the largest. One instance forms a batch at a
    time, so while every instance is busy, requests pile up into bigger batches."""

    def __init__(
        self,
        model: str,
        runtime: Runtime,
        stats: ModelStats,
        max_batch_size: int,
        policy: mc.ModelDynamicBatching,
    ) -> None:
        self._max = max_batch_size
        self._delay_ns = policy.max_queue_delay_microseconds * 1000
        self._preferred = frozenset(policy.preferred_batch_size)
        self._max_preferred = max(self._preferred, default=max_batch_size)
        self._gathering = threading.Lock()
        super().__init__(model, runtime, stats, policy)

    def _take(self) -> list[Job] | None:
        with self._gathering, self._ready:
            while True:
                first = self._first()
                if first is None:
                    return None
                if not self.merges:
                    return [first]
                batch = self._gather(first)
                if batch is not None:
                    return batch

    def _gather(self, first: Job) -> list[Job] | None:
        """The batch to run, starting from `first`; None when a request in it timed out
        while it formed (it is dealt with, the rest put back, and the batch formed anew).
        Holds _ready."""
        batch, size = [first], first.batch_size
        first.forming = True
        marked = 1 if size in self._preferred else 0  # jobs up to the best mark (0: none)
        deadline_ns = first.enqueued_ns + self._delay_ns
        while True:
            full = False
            while (job := self._queue.peek()) is not None:
                if job.future.done():  # its caller gave up while it was queued
                    self._queue.popleft()
                    continue
                grown = size + job.batch_size
                if grown > self._max_preferred and not marked:
                    marked = len(batch)
                if grown > self._max or job.signature != first.signature:
                    full = True  # it starts the next batch
                    break
                batch.append(self._queue.popleft())
                job.forming = True
                size = grown
                if size in self._preferred:
                    marked = len(batch)
            if any(job.expired for job in batch):
                self._expire_forming(batch)
                return None
            remaining_ns = deadline_ns - time.perf_counter_ns()
            waited_out = self._delay_ns > 0 and remaining_ns <= 0
            if marked and not waited_out:
                self._put_back(batch[marked:])
                return batch[:marked]
            if full or size >= self._max_preferred or remaining_ns <= 0 or self._closed:
                return batch
            self._ready.wait(min(remaining_ns / 1e9, threading.TIMEOUT_MAX))

    def _put_back(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.forming = False
        self._queue.push_front(jobs)

    def _expire_forming(self, batch: list[Job]) -> None:
        """Requests of a forming batch that waited past their timeout: failed (REJECT) or
        queued behind the others (DELAY); the rest go back where they were."""
        expired = [job for job in batch if job.expired]
        self._put_back([job for job in batch if not job.expired])
        rejected = []
        for job in expired:
            job.forming = job.expired = False
            if self._queue.policy(job.level).timeout_action == mc.ModelQueuePolicy.DELAY:
                job.delayed = True
                self._queue.append(job)
            else:
                rejected.append(job)
        if rejected:
            self._to_loop(_Execution(rejected, None, self._timeout_error(), 0, 0, 0))


def _merge(jobs: list[Job]) -> Arrays:
    if len(jobs) == 1:
        return jobs[0].inputs
    return {name: np.concatenate([job.inputs[name] for job in jobs]) for name in jobs[0].inputs}


class _NotBatched(InternalError):
    """A merged execution's output does not have the batch's rows as its first dimension."""


def _split(jobs: list[Job], outputs: Arrays) -> list[Arrays]:
    if len(jobs) == 1:
        return [{name: outputs[name] for name in jobs[0].outputs}]
    rows = sum(job.batch_size for job in jobs)
    for name, array in outputs.items():
        if array.shape[:1] != (rows,):
            raise _NotBatched(
                f"output '{name}' has shape {list(array.shape)}: a batch of {rows} rows "
                f"needs {rows} as its first dimension"
            )
    split, offset = [], 0
    for job in jobs:
        end = offset + job.batch_size
        split.append({name: outputs[name][offset:end] for name in job.outputs})
        offset = end
    return split
