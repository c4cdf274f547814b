"""The gateway process: OIP gRPC, admin HTTP and metrics HTTP on one event loop.

Start: every port is bound first, so a port in use is one clear error. The discovery
sources publish into the backend pool; the prober learns what each backend serves.
SIGHUP reloads the config file (backends and routes). SIGTERM or SIGINT drains: the gateway
reports not ready, refuses new requests with UNAVAILABLE, lets the requests in flight finish
(up to drain_timeout_s), then stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CollectorRegistry

from kapi.core.errors import KapiError
from kapi.core.health import ReadinessHealth
from kapi.core.listen import StartupError, bind, http_server
from kapi.core.metrics import metrics_app
from kapi.gateway.admin import admin_app
from kapi.gateway.backends import BackendPool
from kapi.gateway.control import SERVICE, GatewayServicer
from kapi.gateway.discovery import BackendSpec, Discovery
from kapi.gateway.discovery.registration import RegistrationDiscovery
from kapi.gateway.discovery.static import StaticDiscovery
from kapi.gateway.forward import Forwarder
from kapi.gateway.health import Ejection, Prober
from kapi.gateway.metrics import GatewayMetrics
from kapi.gateway.rest import RestForwarder
from kapi.gateway.retry import RetryBudget
from kapi.gateway.router import Router
from kapi.gateway.routes import GatewayConfig, load_config
from kapi.gateway.settings import GatewaySettings
from kapi.gateway.shadow import Shadowing

log = logging.getLogger(__name__)
DRAIN_QUIET_S = 0.5
GRPC_STOP_GRACE_S = 5.0


class GatewayServer:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        config = self._config()
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.pool = BackendPool(settings.channels_per_backend, settings.max_message_bytes)
        self.router = Router(self.pool)
        self.metrics.watch(lambda: self.pool)
        self.router.replace_routes(config.routes)
        self.prober = Prober(
            self.pool,
            self.metrics,
            Ejection(consecutive_failures=settings.ejection_failures),
            settings.health_interval_s,
            settings.refresh_interval_s,
            settings.probe_timeout_s,
            settings.health_check == "grpc-health",
        )
        self.shadowing = Shadowing(self.router, self.metrics)
        self.forwarder = Forwarder(
            self.router,
            self.prober,
            self.metrics,
            self.shadowing,
            RetryBudget(settings.retry_ratio),
        )
        self.servicer = GatewayServicer(self.forwarder, self.router, self.prober)
        self.static = StaticDiscovery(self._static_specs(config))
        self.registrations = RegistrationDiscovery()
        self.sources: list[Discovery] = [self.static, self.registrations]
        if settings.kubernetes_selector is not None:
            from kapi.gateway.discovery.kubernetes import KubernetesDiscovery

            self.sources.append(
                KubernetesDiscovery(
                    namespace=settings.kubernetes_namespace,
                    label_selector=settings.kubernetes_selector,
                    kubeconfig=None if settings.kubeconfig is None else str(settings.kubeconfig),
                )
            )
        self.health = ReadinessHealth(SERVICE.full_name, lambda: self.servicer.ready)
        self._stop = asyncio.Event()

    def _config(self) -> GatewayConfig:
        if self.settings.config is None:
            return GatewayConfig()
        try:
            return load_config(self.settings.config)
        except KapiError as exc:
            raise StartupError(exc.message) from exc

    def _static_specs(self, config: GatewayConfig) -> list[BackendSpec]:
        specs = {entry.address: entry.spec() for entry in config.backends}
        for address in self.settings.backend:
            specs.setdefault(address, BackendSpec(address))
        return list(specs.values())

    async def run(self) -> None:
        grpc_server = self._grpc_server()
        sockets = [bind(self.settings.host, self.settings.http_port, "HTTP")]
        sockets.append(bind(self.settings.host, self.settings.metrics_port, "metrics"))
        rest = RestForwarder(
            self.router, self.servicer, self.metrics, self.settings.max_message_bytes
        )
        app = admin_app(
            self.servicer,
            self.router,
            self.shadowing,
            self.registrations,
            self.settings.admin_token,
            rest,
        )
        http_servers = [http_server(app), http_server(metrics_app(self.registry))]
        await grpc_server.start()
        tasks = [
            asyncio.create_task(server.serve(sockets=[sock]))
            for server, sock in zip(http_servers, sockets, strict=True)
        ]
        for source in self.sources:
            tasks.append(asyncio.create_task(self._discover(source)))
        await self.prober.probe_all()  # what the static backends serve, before the first request
        tasks.append(asyncio.create_task(self.prober.run()))
        tasks.append(asyncio.create_task(self._announce_loop()))
        try:
            self._install_signal_handlers()
            log.info("gateway serving", extra={"grpc_port": self.settings.grpc_port})
            await self._stop.wait()
            await self._drain(grpc_server)
        finally:
            await grpc_server.stop(0)
            for server in http_servers:
                server.should_exit = True
            for task in tasks[len(http_servers) :]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.shadowing.close()
            await rest.close()
            await self.prober.close()
            await self.pool.close()
            for sock in sockets:
                sock.close()
        log.info("gateway stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _discover(self, source: Discovery) -> None:
        def publish(specs: object) -> None:
            self.pool.publish(source.name, specs)  # type: ignore[arg-type]
            for backend in self.pool:
                if backend.stale:
                    self.prober.probe_soon(backend)

        try:
            await source.run(publish)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("discovery source %s stopped", source.name)

    def reload(self) -> None:
        """SIGHUP: the config file's backends and routes replace the current ones."""
        if self.settings.config is None:
            log.info("SIGHUP: no config file to reload")
            return
        try:
            config = load_config(self.settings.config)
        except KapiError as exc:
            log.error("SIGHUP: the config was not reloaded: %s", exc.message)
            return
        self.router.replace_routes(config.routes)
        self.static.replace(
            self._static_specs(config), lambda specs: self.pool.publish("static", specs)
        )
        for backend in self.pool:
            if backend.stale:
                self.prober.probe_soon(backend)
        log.info(
            "config reloaded: %d backends, %d routes", len(config.backends), len(config.routes)
        )

    async def _drain(self, grpc_server: grpc.aio.Server) -> None:
        log.info("draining")
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.forwarder.drain()
        await self.health.announce()
        in_flight = self.forwarder.in_flight
        while time.monotonic() < deadline:
            quiet = time.monotonic() - in_flight.last_change
            if in_flight.count == 0 and quiet >= DRAIN_QUIET_S:
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("drain timeout: stopping with %d requests in flight", in_flight.count)
        await grpc_server.stop(min(GRPC_STOP_GRACE_S, max(deadline - time.monotonic(), 0.1)))

    async def _announce_loop(self) -> None:
        """Watchers learn of changes in backend health (Check asks at once)."""
        while True:
            await self.health.announce()
            await asyncio.sleep(self.settings.health_interval_s)

    def _grpc_server(self) -> grpc.aio.Server:
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.servicer.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen for gRPC on {address}: the address is already in use"
            ) from exc
        return server

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
