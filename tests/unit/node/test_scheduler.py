"""The schedulers on their own, with a runtime that records what it was asked to run and can
be held busy: which requests merge, when a batch closes, what failures and unloading do."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InternalError, InvalidArgument, Unavailable
from kapi.node import scheduler as scheduler_module
from kapi.node.runtimes import Arrays, ModelFiles, Runtime, TensorSpec
from kapi.node.scheduler import DynamicBatcher, InlineScheduler, Job, Scheduler
from kapi.node.stats import ModelStats, NodeMetrics
from prometheus_client import CollectorRegistry

WAIT_S = 10.0  # a bound for things that must happen; never reached when they do
LONG_DELAY_US = 60_000_000  # a queue delay no test waits out


class RecordingRuntime(Runtime):
    """Adds one to every input; records each execution's batch; `hold` keeps it busy."""

    def __init__(self, instances: int = 1) -> None:
        config = mc.ModelConfig(name="m")
        super().__init__(ModelFiles(Path("."), Path("."), "model", config), instances)
        self.batches: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.started = threading.Semaphore(0)
        self.hold = threading.Event()
        self.hold.set()
        self.fail_with: BaseException | None = None
        self._lock = threading.Lock()

    def metadata(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [], []

    def _load(self) -> None:
        pass

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.batches.append(len(inputs["x"]))
        self.started.release()
        try:
            assert self.hold.wait(WAIT_S), "the test never released the runtime"
            if self.fail_with is not None:
                raise self.fail_with
            return {"y": inputs["x"] + 1}
        finally:
            with self._lock:
                self.running -= 1

    async def wait_started(self, executions: int = 1) -> None:
        for _ in range(executions):
            assert await asyncio.to_thread(self.started.acquire, timeout=WAIT_S)


def job(rows: int, columns: int = 2, first: float = 0.0, enqueued_ns: int | None = None) -> Job:
    x = (first + np.arange(rows * columns, dtype=np.float32)).reshape(rows, columns)
    created = Job(
        inputs={"x": x},
        outputs=["y"],
        batch_size=rows,
        signature=(("x", "FP32", (columns,)),),
        future=asyncio.get_running_loop().create_future(),
    )
    if enqueued_ns is not None:
        created.enqueued_ns = enqueued_ns
    return created


def direct(runtime: RecordingRuntime, model_stats: ModelStats | None = None) -> Scheduler:
    return Scheduler("m", runtime, model_stats or new_stats())


def batcher(
    runtime: RecordingRuntime,
    max_batch_size: int = 8,
    delay_us: int = LONG_DELAY_US,
    preferred: tuple[int, ...] = (),
    max_queue_size: int = 0,
) -> DynamicBatcher:
    policy = mc.ModelDynamicBatching(
        max_queue_delay_microseconds=delay_us, preferred_batch_size=list(preferred)
    )
    policy.default_queue_policy.max_queue_size = max_queue_size
    return DynamicBatcher("m", runtime, new_stats(), max_batch_size, policy)


def new_stats() -> ModelStats:
    return ModelStats(NodeMetrics(CollectorRegistry()), "m", "1")


@contextlib.asynccontextmanager
async def serving(scheduler: Scheduler) -> AsyncIterator[Scheduler]:
    """The scheduler, closed (its threads stopped) when the test is done with it."""
    try:
        yield scheduler
    finally:
        assert isinstance(scheduler.runtime, RecordingRuntime)
        scheduler.runtime.hold.set()
        await scheduler.close()


def start(scheduler: Scheduler, jobs: list[Job]) -> list[asyncio.Task[Arrays]]:
    return [asyncio.create_task(scheduler.submit(j)) for j in jobs]


async def results(tasks: list[asyncio.Task[Arrays]]) -> list[Arrays]:
    return await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)


def queued(scheduler: Scheduler) -> int:
    """Requests queued and not yet taken by an instance (the scheduler's own queue)."""
    return len(scheduler._queue)


async def until_queued(scheduler: Scheduler, count: int) -> None:
    """Let the loop run the submit tasks until `count` jobs wait in the queue."""
    deadline = time.monotonic() + WAIT_S
    while queued(scheduler) < count:
        assert time.monotonic() < deadline, f"{queued(scheduler)} queued, not {count}"
        await asyncio.sleep(0.001)


async def until_taken(scheduler: Scheduler, leaving: int = 0) -> None:
    """Let the loop run until an instance has taken all but `leaving` queued requests."""
    await asyncio.sleep(0)  # the submit tasks just started queue their requests first
    deadline = time.monotonic() + WAIT_S
    while queued(scheduler) != leaving:
        assert time.monotonic() < deadline, f"{queued(scheduler)} queued, not {leaving}"
        await asyncio.sleep(0.001)


async def test_direct_runs_each_request_alone_and_returns_its_own_outputs() -> None:
    runtime = RecordingRuntime()
    async with serving(direct(runtime)) as scheduler:
        jobs = [job(1, first=10.0 * n) for n in range(3)] + [job(2, first=99.0)]
        outputs = await results(start(scheduler, jobs))

    assert sorted(runtime.batches) == [1, 1, 1, 2]
    for given, got in zip(jobs, outputs, strict=True):
        np.testing.assert_array_equal(got["y"], given.inputs["x"] + 1, strict=True)


async def test_direct_runs_as_many_at_once_as_there_are_instances() -> None:
    runtime = RecordingRuntime(instances=2)
    runtime.hold.clear()
    async with serving(direct(runtime)) as scheduler:
        tasks = start(scheduler, [job(1, first=n) for n in range(4)])
        await runtime.wait_started(2)
        await until_queued(scheduler, 2)
        assert runtime.running == 2
        runtime.hold.set()
        await results(tasks)

    assert runtime.most_at_once == 2
    assert runtime.batches == [1, 1, 1, 1]


async def test_time_queued_counts_as_queue_time_not_compute() -> None:
    """A request waiting behind a busy instance reports that wait as queue time."""
    runtime = RecordingRuntime()
    runtime.hold.clear()
    model_stats = new_stats()
    async with serving(direct(runtime, model_stats)) as scheduler:
        first, second = job(1), job(1)
        tasks = start(scheduler, [first, second])
        await runtime.wait_started()
        await until_queued(scheduler, 1)
        await asyncio.sleep(0.05)
        runtime.hold.set()
        await results(tasks)

    assert second.queue_ns >= 50_000_000  # it waited while the first one ran
    assert model_stats.execution_count == 2
    assert model_stats.compute_infer.count == 2
    assert model_stats.compute_infer.ns >= 50_000_000  # the first one ran that long


async def test_requests_queued_while_the_instance_is_busy_merge_into_one_batch() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    async with serving(batcher(runtime, max_batch_size=8, delay_us=0)) as scheduler:
        busy = start(scheduler, [job(1, first=-1.0)])
        await runtime.wait_started()
        jobs = [job(1 + n % 2, first=100.0 * n) for n in range(6)]  # 9 rows in all
        tasks = start(scheduler, jobs)
        await until_queued(scheduler, len(jobs))
        runtime.hold.set()
        outputs = await results(busy + tasks)

    # The busy execution; then rows 1+2+1+2+1 = 7, as the next request's 2 would make 9 > 8
    # (a request is never split); then that request on its own.
    assert runtime.batches == [1, 7, 2]
    for given, got in zip(jobs, outputs[1:], strict=True):
        np.testing.assert_array_equal(got["y"], given.inputs["x"] + 1, strict=True)


async def test_requests_of_different_shapes_never_merge() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    async with serving(batcher(runtime, delay_us=0)) as scheduler:
        busy = start(scheduler, [job(1)])
        await runtime.wait_started()
        jobs = [job(1, columns=2), job(1, columns=2), job(1, columns=3), job(1, columns=2)]
        tasks = start(scheduler, jobs)
        await until_queued(scheduler, len(jobs))
        runtime.hold.set()
        outputs = await results(busy + tasks)

    assert runtime.batches == [1, 2, 1, 1]
    for given, got in zip(jobs, outputs[1:], strict=True):
        assert got["y"].shape == given.inputs["x"].shape


async def test_a_free_instance_waits_within_the_delay_for_company() -> None:
    """The first request does not run alone at once: the second, sent after it, joins it."""
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, max_batch_size=2)) as scheduler:
        (first,) = start(scheduler, [job(1)])
        await asyncio.sleep(0.05)
        assert not first.done()
        await results([first, *start(scheduler, [job(1)])])

    assert runtime.batches == [2]


async def test_a_lone_request_runs_once_the_delay_has_passed() -> None:
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, delay_us=100_000)) as scheduler:
        await results(start(scheduler, [job(1)]))

    assert runtime.batches == [1]


async def test_one_instance_at_a_time_forms_a_batch() -> None:
    """With two idle instances, the second request joins the first one's batch instead of
    starting a batch of its own on the other instance."""
    runtime = RecordingRuntime(instances=2)
    async with serving(batcher(runtime, max_batch_size=3)) as scheduler:
        (first,) = start(scheduler, [job(1)])
        await asyncio.sleep(0.05)
        (second,) = start(scheduler, [job(1)])
        await asyncio.sleep(0.05)
        await results([first, second, *start(scheduler, [job(1)])])

    assert runtime.batches == [3]


async def test_a_request_abandoned_while_its_batch_forms_is_left_out() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    async with serving(batcher(runtime, delay_us=0)) as scheduler:
        busy = start(scheduler, [job(1)])
        await runtime.wait_started()
        first, abandoned, last = start(scheduler, [job(1), job(3), job(1)])
        await until_queued(scheduler, 3)
        abandoned.cancel()
        await asyncio.sleep(0)  # the cancellation lands
        runtime.hold.set()
        await results([*busy, first, last])

    assert runtime.batches == [1, 2]


async def test_a_request_abandoned_after_joining_a_forming_batch_is_left_out() -> None:
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, max_batch_size=3)) as scheduler:
        first, abandoned = start(scheduler, [job(1), job(1)])
        await until_taken(scheduler)  # both are in the batch the instance is forming
        abandoned.cancel()
        await asyncio.sleep(0)  # the cancellation lands
        await results([first, *start(scheduler, [job(1)])])

    assert runtime.batches == [2]


async def test_a_preferred_batch_size_closes_the_batch_without_waiting_out_the_delay() -> None:
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, preferred=(2,))) as scheduler:
        await results(start(scheduler, [job(1), job(1)]))

    assert runtime.batches == [2]


async def test_a_full_batch_closes_without_waiting_out_the_delay() -> None:
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, max_batch_size=3)) as scheduler:
        await results(start(scheduler, [job(2), job(1)]))

    assert runtime.batches == [3]


async def behind_busy(scheduler: Scheduler, busy: Job, queued: list[Job]) -> None:
    """Hold the runtime on `busy`, queue `queued` behind it, then let them all run."""
    runtime = scheduler.runtime
    assert isinstance(runtime, RecordingRuntime)
    runtime.hold.clear()
    first = start(scheduler, [busy])
    await runtime.wait_started()
    tasks = start(scheduler, queued)
    await until_queued(scheduler, len(queued))
    runtime.hold.set()
    await results(first + tasks)


async def test_a_request_as_large_as_the_largest_preferred_size_runs_at_once() -> None:
    """Triton's rule: a batch that reaches the largest preferred size runs now, even when
    it is no preferred size itself (7 with [2, 6]) and the delay is long."""
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, preferred=(2, 6))) as scheduler:
        await results(start(scheduler, [job(7)]))

    assert runtime.batches == [7]


async def test_a_request_that_would_overflow_the_batch_sends_the_pending_one() -> None:
    """4 is pending when 7 arrives: 4 + 7 is past max_batch_size, so the 4 runs now and the
    7 forms the next batch, which runs at once too (7 >= the largest preferred size)."""
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, preferred=(2, 6))) as scheduler:
        # 6 runs at once (the largest preferred size); the rest queue behind it.
        await behind_busy(scheduler, job(6), [job(4), job(7)])

    assert runtime.batches == [6, 4, 7]


async def test_the_batcher_looks_past_a_preferred_size_for_a_larger_one() -> None:
    """Queued 1, 1, 2, 2 with preferred [2, 6]: 2 is preferred, but the scan goes on and
    finds 6, which it runs."""
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, preferred=(2, 6))) as scheduler:
        # 6 runs at once (the largest preferred size); the rest queue behind it.
        await behind_busy(scheduler, job(6), [job(1), job(1), job(2), job(2)])

    assert runtime.batches == [6, 6]


async def test_a_batch_stops_short_of_passing_the_largest_preferred_size() -> None:
    """Queued 4 then 3 with preferred [2, 6] and max_batch_size 8: 4 + 3 would pass 6, so
    the batch is marked at 4 and runs as 4 (Triton does not go past its preferred sizes
    while the delay lasts); the 3 waits out its delay alone."""
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, delay_us=100_000, preferred=(2, 6))) as scheduler:
        # 6 runs at once (the largest preferred size); the rest queue behind it.
        await behind_busy(scheduler, job(6), [job(4), job(3)])

    assert runtime.batches == [6, 4, 3]


async def test_without_preferred_sizes_the_batcher_fills_the_largest_batch_it_can() -> None:
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, max_batch_size=8)) as scheduler:
        await behind_busy(scheduler, job(8), [job(3), job(2), job(3)])  # 8: full, runs at once

    assert runtime.batches == [8, 8]  # full, so it runs without waiting out the delay


async def test_the_delay_counts_from_the_oldest_requests_arrival() -> None:
    """A request that already waited longer than the delay runs at once, alone."""
    runtime = RecordingRuntime()
    async with serving(batcher(runtime, delay_us=LONG_DELAY_US)) as scheduler:
        old = job(1, enqueued_ns=time.perf_counter_ns() - 2 * LONG_DELAY_US * 1000)
        await results(start(scheduler, [old]))

    assert runtime.batches == [1]


async def test_a_full_queue_refuses_as_triton_does() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    async with serving(batcher(runtime, delay_us=0, max_queue_size=2)) as scheduler:
        tasks = start(scheduler, [job(1)])
        await runtime.wait_started()
        tasks += start(scheduler, [job(1), job(1)])
        await until_queued(scheduler, 2)
        with pytest.raises(Unavailable, match="exceeds maximum queue size"):
            await scheduler.submit(job(1))
        runtime.hold.set()
        await results(tasks)

    assert runtime.batches == [1, 2]


async def test_requests_abandoned_while_queued_do_not_fill_the_queue() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    async with serving(batcher(runtime, delay_us=0, max_queue_size=2)) as scheduler:
        busy = start(scheduler, [job(1)])
        await runtime.wait_started()
        abandoned = start(scheduler, [job(1), job(1)])
        await until_queued(scheduler, 2)
        for task in abandoned:
            task.cancel()
        live = start(scheduler, [job(1, first=7.0)])
        await until_taken(scheduler, leaving=1)  # the live request replaced both
        runtime.hold.set()
        await results(busy)
        (result,) = await results(live)

    np.testing.assert_array_equal(result["y"], [[8.0, 9.0]])
    assert runtime.batches == [1, 1]


async def test_a_failed_execution_fails_its_requests_and_the_model_serves_on() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    async with serving(batcher(runtime, delay_us=0)) as scheduler:
        busy = start(scheduler, [job(1)])
        await runtime.wait_started()
        doomed = start(scheduler, [job(1), job(1)])
        await until_queued(scheduler, 2)
        runtime.fail_with = ValueError("device on fire")
        runtime.hold.set()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*busy, *doomed, return_exceptions=True), WAIT_S
        )
        runtime.fail_with = None
        (after,) = await results(start(scheduler, [job(1, first=5.0)]))

    assert all(isinstance(outcome, InternalError) for outcome in outcomes)
    assert "inference failed: device on fire" in str(outcomes[-1])
    np.testing.assert_array_equal(after["y"], [[6.0, 7.0]])


class Fatal(BaseException):
    """Not an Exception: what a runtime's C code or a stray sys.exit could raise."""


async def test_an_instance_survives_a_base_exception_from_the_runtime() -> None:
    runtime = RecordingRuntime()
    runtime.fail_with = Fatal("not an Exception")
    async with serving(direct(runtime)) as scheduler:
        with pytest.raises(InternalError, match="inference failed: not an Exception"):
            await results(start(scheduler, [job(1)]))
        runtime.fail_with = None
        (after,) = await results(start(scheduler, [job(1)]))

    np.testing.assert_array_equal(after["y"], [[1.0, 2.0]])


class SummingRuntime(RecordingRuntime):
    """A model whose output has no batch dimension: one value for the whole batch."""

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        super().infer(inputs, outputs)
        return {"y": np.array([inputs["x"].sum()])}


async def test_a_batched_output_without_the_batch_dimension_runs_each_request_alone() -> None:
    """A merged execution whose output lacks the batch's rows is not split wrongly nor
    failed: each request runs again alone (as it would have succeeded unbatched), and the
    model's requests run one at a time from then on."""
    runtime = SummingRuntime()
    runtime.hold.clear()
    async with serving(batcher(runtime, delay_us=0)) as scheduler:
        busy = start(scheduler, [job(1)])
        await runtime.wait_started()
        merged = start(scheduler, [job(1, first=10.0), job(1, first=20.0)])
        await until_queued(scheduler, 2)
        runtime.hold.set()
        await results(busy)
        outcomes = await results(merged)
        later = start(scheduler, [job(1), job(1)])
        await results(later)

    assert [outcome["y"].tolist() for outcome in outcomes] == [[21.0], [41.0]]
    assert runtime.batches == [1, 2, 1, 1, 1, 1]
    assert not scheduler.merges


async def test_a_kapi_error_from_the_runtime_reaches_the_caller_as_it_is() -> None:
    runtime = RecordingRuntime()
    runtime.fail_with = InvalidArgument("bad tensor")
    async with serving(direct(runtime)) as scheduler:
        with pytest.raises(InvalidArgument, match="bad tensor"):
            await results(start(scheduler, [job(1)]))


async def test_a_request_cancelled_while_queued_is_not_run() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    async with serving(direct(runtime)) as scheduler:
        busy = start(scheduler, [job(1)])
        await runtime.wait_started()
        (abandoned,) = start(scheduler, [job(3)])
        await until_queued(scheduler, 1)
        abandoned.cancel()
        tasks = start(scheduler, [job(2)])
        await until_queued(scheduler, 2)
        runtime.hold.set()
        await results(busy + tasks)

    assert abandoned.cancelled()
    assert runtime.batches == [1, 2]


async def test_closing_while_a_batch_forms_runs_the_batch_it_has() -> None:
    runtime = RecordingRuntime()
    scheduler = batcher(runtime)  # waits a minute for company
    (waiting,) = start(scheduler, [job(1, first=3.0)])
    await until_taken(scheduler)

    await asyncio.wait_for(scheduler.close(), WAIT_S)

    (done,) = await results([waiting])
    np.testing.assert_array_equal(done["y"], [[4.0, 5.0]])
    assert runtime.batches == [1]


async def test_closing_finishes_running_work_and_fails_what_is_queued() -> None:
    runtime = RecordingRuntime()
    runtime.hold.clear()
    scheduler = batcher(runtime, delay_us=0)
    running = start(scheduler, [job(1)])
    await runtime.wait_started()
    queued = start(scheduler, [job(1), job(1)])
    await until_queued(scheduler, 2)

    closing = asyncio.create_task(scheduler.close())
    await asyncio.sleep(0.01)
    assert not closing.done()  # waits for the running execution
    runtime.hold.set()
    await asyncio.wait_for(closing, WAIT_S)

    (done,) = await results(running)
    np.testing.assert_array_equal(done["y"], [[1.0, 2.0]])
    for task in queued:
        with pytest.raises(Unavailable, match="unloaded"):
            await task
    with pytest.raises(Unavailable, match="unloading"):
        await scheduler.submit(job(1))
    assert runtime.batches == [1]


# --- priority levels and queue policies, as Triton's PriorityQueue ---------------------------


class OrderRuntime(RecordingRuntime):
    """Records the first value of each execution's input: which request ran when."""

    def __init__(self) -> None:
        super().__init__()
        self.firsts: list[float] = []

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        self.firsts.append(float(inputs["x"][0, 0]))
        return super().infer(inputs, outputs)


def queued_batcher(runtime: RecordingRuntime, batching: str) -> DynamicBatcher:
    """A batcher that runs each request alone, at once, with the policy in `batching`."""
    policy = text_format.Parse(batching, mc.ModelDynamicBatching())
    return DynamicBatcher("m", runtime, new_stats(), 1, policy)


def prioritised(rows: int, first: float, priority: int = 0, timeout_us: int = 0) -> Job:
    created = job(rows, first=first)
    created.priority, created.timeout_us = priority, timeout_us
    return created


async def test_a_higher_priority_request_runs_first() -> None:
    runtime = OrderRuntime()
    runtime.hold.clear()
    batching = "priority_levels: 3 default_priority_level: 3"
    async with serving(queued_batcher(runtime, batching)) as scheduler:
        busy = start(scheduler, [prioritised(1, 0.0)])
        await runtime.wait_started()
        tasks = start(
            scheduler,
            [
                prioritised(1, 30.0, priority=3),
                prioritised(1, 99.0, priority=0),  # 0: the default level, 3
                prioritised(1, 20.0, priority=2),
                prioritised(1, 77.0, priority=9),  # past the levels: the default level
                prioritised(1, 10.0, priority=1),
            ],
        )
        await until_queued(scheduler, 5)
        runtime.hold.set()
        await results(busy + tasks)

    assert runtime.firsts == [0.0, 10.0, 20.0, 30.0, 99.0, 77.0]


async def test_a_request_that_waits_past_its_timeout_is_rejected_in_tritons_words() -> None:
    runtime = OrderRuntime()
    runtime.hold.clear()
    batching = "default_queue_policy { default_timeout_microseconds: 50000 }"
    async with serving(queued_batcher(runtime, batching)) as scheduler:
        busy = start(scheduler, [prioritised(1, 0.0)])
        await runtime.wait_started()
        (late,) = start(scheduler, [prioritised(1, 5.0)])
        with pytest.raises(Unavailable, match="Request timeout expired"):
            await asyncio.wait_for(late, WAIT_S)  # while the instance is still busy
        runtime.hold.set()
        await results(busy)

    assert runtime.firsts == [0.0]


async def test_a_request_may_shorten_its_timeout_only_when_the_policy_allows() -> None:
    runtime = OrderRuntime()
    runtime.hold.clear()
    allowed = (
        "default_queue_policy { default_timeout_microseconds: 60000000 "
        "allow_timeout_override: true }"
    )
    async with serving(queued_batcher(runtime, allowed)) as scheduler:
        busy = start(scheduler, [prioritised(1, 0.0)])
        await runtime.wait_started()
        (short,) = start(scheduler, [prioritised(1, 5.0, timeout_us=30_000)])
        with pytest.raises(Unavailable, match="Request timeout expired"):
            await asyncio.wait_for(short, WAIT_S)
        runtime.hold.set()
        await results(busy)

    runtime = OrderRuntime()
    runtime.hold.clear()
    refused = "default_queue_policy { default_timeout_microseconds: 60000000 }"
    async with serving(queued_batcher(runtime, refused)) as scheduler:
        busy = start(scheduler, [prioritised(1, 0.0)])
        await runtime.wait_started()
        waits = start(scheduler, [prioritised(1, 5.0, timeout_us=30_000)])
        await asyncio.sleep(0.2)
        assert not waits[0].done()  # the override is not allowed: it keeps waiting
        runtime.hold.set()
        await results(busy + waits)

    assert runtime.firsts == [0.0, 5.0]


async def test_a_delayed_request_runs_after_those_that_did_not_time_out() -> None:
    runtime = OrderRuntime()
    runtime.hold.clear()
    batching = "default_queue_policy { default_timeout_microseconds: 30000 timeout_action: DELAY }"
    async with serving(queued_batcher(runtime, batching)) as scheduler:
        busy = start(scheduler, [prioritised(1, 0.0)])
        await runtime.wait_started()
        delayed = start(scheduler, [prioritised(1, 1.0)])
        await asyncio.sleep(0.1)  # it timed out: moved behind the requests that come next
        fresh = start(scheduler, [prioritised(1, 2.0)])
        await until_queued(scheduler, 2)
        runtime.hold.set()
        await results(busy + delayed + fresh)

    assert runtime.firsts == [0.0, 2.0, 1.0]


async def test_each_priority_level_has_its_own_queue_size() -> None:
    runtime = OrderRuntime()
    runtime.hold.clear()
    batching = (
        "priority_levels: 2 default_priority_level: 2 "
        "priority_queue_policy { key: 1 value { max_queue_size: 1 } }"
    )
    async with serving(queued_batcher(runtime, batching)) as scheduler:
        busy = start(scheduler, [prioritised(1, 0.0)])
        await runtime.wait_started()
        tasks = start(scheduler, [prioritised(1, 1.0, priority=1)])
        tasks += start(scheduler, [prioritised(1, 2.0, priority=2) for _ in range(3)])
        await until_queued(scheduler, 4)
        with pytest.raises(Unavailable, match="exceeds maximum queue size"):
            await scheduler.submit(prioritised(1, 3.0, priority=1))
        runtime.hold.set()
        await results(busy + tasks)

    assert runtime.firsts == [0.0, 1.0, 2.0, 2.0, 2.0]


async def test_a_request_that_times_out_while_its_batch_forms_is_rejected() -> None:
    """The batch waits a minute for company; the request's timeout, 50 ms, comes first."""
    runtime = RecordingRuntime()
    policy = text_format.Parse(
        f"max_queue_delay_microseconds: {LONG_DELAY_US} "
        "default_queue_policy { default_timeout_microseconds: 50000 }",
        mc.ModelDynamicBatching(),
    )
    async with serving(DynamicBatcher("m", runtime, new_stats(), 8, policy)) as scheduler:
        (waiting,) = start(scheduler, [job(1)])
        await until_taken(scheduler)  # in the forming batch
        with pytest.raises(Unavailable, match="Request timeout expired"):
            await asyncio.wait_for(waiting, WAIT_S)

    assert runtime.batches == []


# --- the inline scheduler, for models whose executions take microseconds -------------------


class ThreadRecordingRuntime(RecordingRuntime):
    """Records the thread each execution runs on. With a clock, an execution of `seconds`
    moves that clock on instead of sleeping, so that its measured duration is exact."""

    def __init__(self, seconds: float = 0.0, clock: FakeClock | None = None) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.seconds = seconds
        self.clock = clock

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        self.threads.append(threading.current_thread().name)
        if self.clock is not None:
            self.clock.ns += int(self.seconds * 1e9)
        else:
            time.sleep(self.seconds)
        return super().infer(inputs, outputs)


class FakeClock:
    """time.perf_counter_ns as the scheduler reads it, moved on by the runtime alone."""

    def __init__(self) -> None:
        self.ns = time.perf_counter_ns()

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(scheduler_module.time, "perf_counter_ns", fake)
    return fake


async def test_a_quick_model_runs_on_the_event_loop() -> None:
    runtime = ThreadRecordingRuntime()
    model_stats = new_stats()
    async with serving(InlineScheduler("m", runtime, model_stats)) as scheduler:
        (result,) = await results(start(scheduler, [job(2, first=1.0)]))

    np.testing.assert_array_equal(result["y"], np.arange(4, dtype=np.float32).reshape(2, 2) + 2)
    assert runtime.threads == [threading.current_thread().name]
    assert model_stats.execution_count == 1


async def test_a_model_slower_than_expected_goes_back_to_its_threads(clock: FakeClock) -> None:
    """Executions of 5 ms: the moving average passes SLOW_INLINE_NS on the third (a clock of
    its own: a real 5 ms sleep that took 5.5 ms on a loaded machine passed it on the second)."""
    runtime = ThreadRecordingRuntime(seconds=0.005, clock=clock)
    async with serving(InlineScheduler("m", runtime, new_stats())) as scheduler:
        for _ in range(4):
            await results(start(scheduler, [job(1)]))

    loop = threading.current_thread().name
    assert runtime.threads == [loop, loop, loop, "m:0"]
    assert not scheduler.inline


async def test_one_slow_execution_keeps_a_quick_model_on_the_loop(clock: FakeClock) -> None:
    """An execution the OS preempted is no reason to leave the loop."""
    runtime = ThreadRecordingRuntime(seconds=0.005, clock=clock)
    async with serving(InlineScheduler("m", runtime, new_stats())) as scheduler:
        await results(start(scheduler, [job(1)]))
        runtime.seconds = 0.0
        for _ in range(20):
            await results(start(scheduler, [job(1)]))

    assert scheduler.inline
    assert set(runtime.threads) == {threading.current_thread().name}


async def test_an_inline_failure_reaches_the_caller() -> None:
    runtime = ThreadRecordingRuntime()
    runtime.fail_with = ValueError("device on fire")
    async with serving(InlineScheduler("m", runtime, new_stats())) as scheduler:
        with pytest.raises(InternalError, match="inference failed: device on fire"):
            await scheduler.submit(job(1))
