"""Active health checks, what each backend serves, and latency outliers.

Every `interval_s` each backend is asked ServerReady (or grpc.health.v1's Check, when the
gateway is told to use it). A ready backend whose picture is stale (new, after an error, or
older than `refresh_s`) is asked again what it is (ServerMetadata) and what it serves
(RepositoryIndex, ready models only). An ejected backend is probed back: once its ejection
ends it takes requests again, and fails back out faster if it is still bad.

Latency outliers are judged per model, against the other backends serving that model: a
backend whose average for a model is `factor` times their median (and above `floor_s`) is
ejected, once each average has seen `latency_samples` requests (a cold start is slow).
Backends that serve different models are never compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.gateway.backends import Backend, BackendPool
from kapi.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass
class Ejection:
    """When a backend is taken out, and for how long."""

    consecutive_failures: int = 5
    base_s: float = 2.0
    max_s: float = 60.0
    latency_factor: float = 10.0
    latency_floor_s: float = 0.005
    # Requests a model's average must have seen before it is judged (a cold start is slow).
    latency_samples: int = 20


class Prober:
    def __init__(
        self,
        pool: BackendPool,
        metrics: GatewayMetrics,
        ejection: Ejection,
        interval_s: float = 1.0,
        refresh_s: float = 10.0,
        timeout_s: float = 2.0,
        grpc_health: bool = False,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.ejection = ejection
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.grpc_health = grpc_health
        self._refreshed: dict[str, float] = {}
        self._now: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.probe_all()
                self.eject_latency_outliers()
                await self.pool.close_removed()
            except Exception:  # a bug here must not freeze every backend's health
                log.exception("health probes failed; trying again")
            await asyncio.sleep(self.interval_s)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(backend) for backend in self.pool))

    def probe_soon(self, backend: Backend) -> None:
        """Probe `backend` now, out of turn (after an error): at most one such probe at once."""
        task = self._now.get(backend.address)
        if task is None or task.done():
            self._now[backend.address] = asyncio.create_task(self.probe(backend))

    async def probe(self, backend: Backend) -> None:
        ready = await self._ready(backend)
        if ready and (
            backend.stale
            or time.monotonic() - self._refreshed.get(backend.address, 0.0) > self.refresh_s
        ):
            ready = await self._refresh(backend)
        if ready != backend.healthy:
            log.info("backend %s is %s", backend.address, "healthy" if ready else "not healthy")
        backend.healthy = ready
        if not ready:
            backend.stale = True

    async def _ready(self, backend: Backend) -> bool:
        try:
            if self.grpc_health:
                call = backend.channel().unary_unary(HEALTH_CHECK)
                data = await call(
                    health_pb2.HealthCheckRequest().SerializeToString(), timeout=self.timeout_s
                )
                status = health_pb2.HealthCheckResponse.FromString(data).status
                return bool(status == health_pb2.HealthCheckResponse.SERVING)
            data = await backend.unary("ServerReady")(b"", timeout=self.timeout_s)
            return bool(pb.ServerReadyResponse.FromString(data).ready)
        except grpc.aio.AioRpcError:
            return False

    async def _refresh(self, backend: Backend) -> bool:
        """Learn what `backend` is and serves; False when it would not say."""
        try:
            metadata = pb.ServerMetadataResponse.FromString(
                await backend.unary("ServerMetadata")(b"", timeout=self.timeout_s)
            )
            index = pb.RepositoryIndexResponse.FromString(
                await backend.unary("RepositoryIndex")(
                    pb.RepositoryIndexRequest(ready=True).SerializeToString(),
                    timeout=self.timeout_s,
                )
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "backend %s: cannot learn what it serves: %s", backend.address, exc.details()
            )
            return False
        backend.learn(metadata.name, metadata.version, tuple(metadata.extensions))
        models: dict[str, set[str]] = {}
        for entry in index.models:
            if entry.state == "READY":
                versions = models.setdefault(entry.name, set())
                if entry.version:
                    versions.add(entry.version)
        backend.models = {name: frozenset(versions) for name, versions in models.items()}
        backend.stale = False
        self._refreshed[backend.address] = time.monotonic()
        return True

    def failed(self, backend: Backend, reason: str) -> None:
        """A request to `backend` failed in a way that counts against it."""
        backend.consecutive_failures += 1
        backend.failures += 1
        if backend.consecutive_failures >= self.ejection.consecutive_failures:
            self._eject(backend, "failures", reason)

    def unreachable(self, backend: Backend, reason: str) -> None:
        """`backend` could not be reached: out until a probe finds it ready again."""
        backend.failures += 1
        if backend.healthy:
            log.warning("backend %s unreachable: %s", backend.address, reason)
        backend.healthy = False
        backend.stale = True
        self.probe_soon(backend)

    def eject_latency_outliers(self) -> None:
        now = time.monotonic()
        by_model: dict[str, list[tuple[Backend, float]]] = {}
        for backend in self.pool:
            if backend.healthy and not backend.ejected(now):
                for model, latency in backend.model_latency_s.items():
                    if backend.model_samples.get(model, 0) >= self.ejection.latency_samples:
                        by_model.setdefault(model, []).append((backend, latency))
        for model, entries in by_model.items():
            if len(entries) < 3:  # a median of one peer says little
                continue
            for backend, latency in entries:
                peers = [other for b, other in entries if b is not backend]
                threshold = self.ejection.latency_factor * statistics.median(peers)
                if latency > max(threshold, self.ejection.latency_floor_s):
                    reason = f"{model}: {latency * 1000:.1f} ms against its peers' median"
                    self._eject(backend, "latency", reason)
                    # Its average starts over when it comes back.
                    backend.model_latency_s.pop(model, None)
                    backend.model_samples.pop(model, None)

    def _eject(self, backend: Backend, kind: str, reason: str) -> None:
        now = time.monotonic()
        if backend.ejected(now):
            return
        backend.eject(now, self.ejection.base_s, self.ejection.max_s)
        backend.consecutive_failures = 0
        self.metrics.ejections.labels(backend.address, kind).inc()
        log.warning(
            "backend %s ejected for %.1f s (%s: %s)",
            backend.address,
            backend.ejected_until - now,
            kind,
            reason,
        )

    async def close(self) -> None:
        for task in self._now.values():
            task.cancel()
        for task in self._now.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
