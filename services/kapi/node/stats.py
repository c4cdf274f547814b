"""Per model-version statistics: Triton's ModelStatistics counters and Prometheus metrics."""

from __future__ import annotations

import time
from collections import Counter as Counter_
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from kapi.core.metrics import BATCH_BUCKETS, LATENCY_BUCKETS


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class NodeMetrics:
    """The node's Prometheus metric families, labelled by model and version."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "version")
        # How many loaded ModelStats count into each version's series: a reload of a
        # version loads the new one before the old one closes, and both share the series.
        self._users: Counter_[tuple[str, str]] = Counter_()
        self.requests = Counter(
            "kapi_node_inference_requests",
            "Inference requests by outcome",
            (*labels, "outcome"),
            registry=registry,
        )
        self.request_seconds = Histogram(
            "kapi_node_request_duration_seconds",
            "Time from receiving a request to its response",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "kapi_node_queue_duration_seconds",
            "Time a request waited in the scheduler queue",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "kapi_node_compute_duration_seconds",
            "Time of one model execution (a whole batch)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "kapi_node_batch_size",
            "Batch size of each model execution",
            labels,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

    def acquire(self, model: str, version: str) -> None:
        self._users[model, version] += 1

    def release(self, model: str, version: str) -> None:
        """Drop a version's series once the last ModelStats that counts into them closes."""
        self._users[model, version] -= 1
        if self._users[model, version] > 0:
            return
        del self._users[model, version]
        for outcome in ("success", "failure"):
            self.requests.remove(model, version, outcome)
        for family in (
            self.request_seconds,
            self.queue_seconds,
            self.compute_seconds,
            self.batch_size,
        ):
            family.remove(model, version)


class ModelStats:
    """Counters for one model version, updated on the event loop only."""

    def __init__(self, metrics: NodeMetrics, model: str, version: str) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: defaultdict[int, BatchDurations] = defaultdict(BatchDurations)
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._metrics = metrics
        self._labels = (model, version)
        metrics.acquire(model, version)
        self._requests_ok = metrics.requests.labels(model, version, "success")
        self._requests_failed = metrics.requests.labels(model, version, "failure")
        self._request_seconds = metrics.request_seconds.labels(model, version)
        self._queue_seconds = metrics.queue_seconds.labels(model, version)
        self._compute_seconds = metrics.compute_seconds.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)

    def close(self) -> None:
        """This version is unloaded: its Prometheus series go, unless a reload of the same
        version shares them."""
        self._metrics.release(*self._labels)

    def record_request(self, ns: int, queue_ns: int, ok: bool, batch_size: int) -> None:
        if ok:
            self.success.add(ns)
            self.queue.add(queue_ns)
            self.inference_count += batch_size
            self._requests_ok.inc()
            self._queue_seconds.observe(queue_ns / 1e9)
        else:
            self.fail.add(ns)
            self._requests_failed.inc()
        self._request_seconds.observe(ns / 1e9)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One model execution that served `requests` requests with `batch_size` items."""
        self.execution_count += 1
        self.compute_input.add(input_ns, requests)
        self.compute_infer.add(infer_ns, requests)
        self.compute_output.add(output_ns, requests)
        batch = self.batches[batch_size]
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
        self._compute_seconds.observe((input_ns + infer_ns + output_ns) / 1e9)
        self._batch_size.observe(batch_size)
