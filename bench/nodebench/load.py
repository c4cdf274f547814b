"""Closed-loop load: `concurrency` threads, each sending one request at a time, for a fixed
time after a warm-up. Every contender (in-process session or a server behind tritonclient)
is driven through the same loop, so the numbers differ only by what serves the request.
A cell is measured in several short rounds; `summarize` pools them. For a served contender
the server's CPU time is read at the start and the end of each measured round, when no
request is in flight, so it is the CPU the round's requests cost the server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Call = Callable[[], object]
# Called once per thread: a thread gets its own client, as a separate caller would have.
CallFactory = Callable[[], Call]
CpuClock = Callable[[], float]  # seconds of CPU a server has used so far


@dataclass(frozen=True, slots=True)
class LoadRun:
    """One measured round: every request's latency (seconds), the round's length and, for a
    server, the CPU seconds it used in the round."""

    latencies: list[float]
    seconds: float
    server_cpu_s: float | None = None

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    throughput: float  # requests per second: the median round's
    throughput_min: float
    throughput_max: float
    p50_ms: float  # latency percentiles over every request of every round
    p99_ms: float
    server_cpu_us: float | None  # server CPU per request over every round; None: no server


@dataclass(slots=True)
class _Window:
    """The measured interval, shared by the threads; set when they all finish warming up."""

    warmup_s: float
    measure_s: float
    cpu: CpuClock | None
    warm_until: float = 0.0
    start: float = 0.0
    deadline: float = 0.0
    cpu_start: float = 0.0
    errors: list[BaseException] = field(default_factory=list)

    def open(self) -> None:
        if self.cpu is not None:
            self.cpu_start = self.cpu()
        self.start = time.perf_counter()
        self.deadline = self.start + self.measure_s


def run_closed_loop(
    make_call: CallFactory,
    concurrency: int,
    warmup_s: float,
    measure_s: float,
    cpu: CpuClock | None = None,
) -> LoadRun:
    window = _Window(warmup_s, measure_s, cpu)
    barrier = threading.Barrier(concurrency, action=window.open)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    finished = [0.0] * concurrency
    calls = [make_call() for _ in range(concurrency)]
    window.warm_until = time.perf_counter() + warmup_s
    threads = [
        threading.Thread(
            target=_client_thread,
            args=(calls[index], window, barrier, latencies[index], finished, index),
            name=f"load-{index}",
            daemon=True,  # a bench stopped by a signal must not wait for its clients
        )
        for index in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if window.errors:
        raise RuntimeError(f"{len(window.errors)} load thread(s) failed") from window.errors[0]
    server_cpu_s = None if cpu is None else cpu() - window.cpu_start
    pooled = [x for thread in latencies for x in thread]
    return LoadRun(pooled, max(finished) - window.start, server_cpu_s)


def _client_thread(
    call: Call,
    window: _Window,
    barrier: threading.Barrier,
    latencies: list[float],
    finished: list[float],
    index: int,
) -> None:
    try:
        while time.perf_counter() < window.warm_until:
            call()
        barrier.wait()
        finished[index] = _measure(call, window.deadline, latencies)
    except threading.BrokenBarrierError:
        return  # another thread failed; its error is the one reported
    except BaseException as exc:  # reported by run_closed_loop once every thread stopped
        window.errors.append(exc)
        barrier.abort()


def _measure(call: Call, deadline: float, latencies: list[float]) -> float:
    now = time.perf_counter()
    while now < deadline:
        call()
        end = time.perf_counter()
        latencies.append(end - now)
        now = end
    return now


def summarize(runs: list[LoadRun]) -> LoadResult:
    latencies = np.asarray([x for run in runs for x in run.latencies])
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    rates = [run.throughput for run in runs]
    cpu = [run.server_cpu_s for run in runs if run.server_cpu_s is not None]
    server_cpu_us = sum(cpu) / len(latencies) * 1e6 if len(cpu) == len(runs) else None
    return LoadResult(
        requests=len(latencies),
        seconds=sum(run.seconds for run in runs),
        throughput=float(np.median(rates)),
        throughput_min=min(rates),
        throughput_max=max(rates),
        p50_ms=float(p50),
        p99_ms=float(p99),
        server_cpu_us=server_cpu_us,
    )
