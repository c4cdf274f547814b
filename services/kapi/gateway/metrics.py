"""The gateway's Prometheus metrics, served on its metrics port.

Per model, version and backend: requests by outcome (the gRPC code), latency, retries;
per backend: ejections and requests in flight; per model and shadow: shadow requests and
their agreement with the primary. A request's labelled children are looked up once per
(model, version, backend) and kept, as that lookup costs more than the observation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kapi.core.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kapi_gateway_requests",
            "Requests answered through the gateway, by model, version, backend and gRPC code",
            ["model", "version", "backend", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "kapi_gateway_request_duration_seconds",
            "Time from receiving a request to answering it, backend included",
            ["model", "version", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "kapi_gateway_retries",
            "Requests sent again to another backend after one could not be reached",
            ["model"],
            registry=registry,
        )
        self.ejections = Counter(
            "kapi_gateway_ejections",
            "Times a backend was taken out of rotation (failures or latency)",
            ["backend", "reason"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "kapi_gateway_shadow_requests",
            "Requests mirrored to a shadow, by outcome (ok, error, dropped)",
            ["model", "shadow", "outcome"],
            registry=registry,
        )
        self.shadow_latency = Histogram(
            "kapi_gateway_shadow_duration_seconds",
            "Time a shadow took to answer a mirrored request",
            ["model", "shadow"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.shadow_agreement = Gauge(
            "kapi_gateway_shadow_agreement",
            "Top-1 agreement of the shadow's answers with the primary's, so far",
            ["model", "shadow"],
            registry=registry,
        )
        self.shadow_max_abs_diff = Gauge(
            "kapi_gateway_shadow_max_abs_difference",
            "Largest absolute difference between the shadow's outputs and the primary's",
            ["model", "shadow"],
            registry=registry,
        )
        self._registry = registry
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._outcomes: dict[tuple[str, str, str, str], Any] = {}

    def answered(self, model: str, version: str, backend: str, code: str, seconds: float) -> None:
        key = (model, version, backend)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.latency.labels(*key),
                self.requests.labels(*key, "OK"),
            )
        histogram, ok = children
        histogram.observe(seconds)
        if code == "OK":
            ok.inc()
        else:
            outcome = self._outcomes.get((*key, code))
            if outcome is None:
                outcome = self._outcomes[(*key, code)] = self.requests.labels(*key, code)
            outcome.inc()

    def watch(self, backends: Callable[[], Iterable[Any]]) -> None:
        """Per-backend gauges read when scraped (in flight, health): nothing per request."""
        self._registry.register(_BackendCollector(backends))


class _BackendCollector(Collector):
    def __init__(self, backends: Callable[[], Iterable[Any]]) -> None:
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "kapi_gateway_in_flight",
            "Requests sent to a backend and not yet answered",
            labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "kapi_gateway_backend_healthy", "1 while a backend answers ready", labels=["backend"]
        )
        for backend in self._backends():
            in_flight.add_metric([backend.address], backend.outstanding)
            healthy.add_metric([backend.address], 1.0 if backend.healthy else 0.0)
        yield in_flight
        yield healthy
