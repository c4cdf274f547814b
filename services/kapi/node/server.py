"""The node process: OIP gRPC, health HTTP and metrics HTTP on one event loop.

SIGTERM or SIGINT: the node reports not-ready, stops taking requests, lets in-flight ones
finish (up to drain_timeout_s), unloads its models and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from kapi.core._generated._pool import POOL
from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core._generated.inference import grpc_service_pb2_grpc as pb_grpc
from kapi.core.errors import KapiError
from kapi.core.metrics import metrics_app
from kapi.node.dataplane import DataPlane
from kapi.node.grpc_service import InferenceServicer
from kapi.node.http import health_app
from kapi.node.repository import ModelRepository
from kapi.node.settings import NodeSettings
from kapi.node.stats import NodeMetrics

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class NodeServer:
    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.repository = ModelRepository(
            settings.model_repository,
            NodeMetrics(self.registry),
            settings.default_max_batch_size,
            settings.drain_timeout_s,
        )
        self.dataplane = DataPlane(
            self.repository,
            settings.model_control_mode == "explicit",
            settings.max_message_bytes,
        )
        self.health = health.aio.HealthServicer()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        grpc_server = self._grpc_server()
        await grpc_server.start()
        http_servers = [
            self._http_server(health_app(self.dataplane), self.settings.http_port),
            self._http_server(metrics_app(self.registry), self.settings.metrics_port),
        ]
        http_tasks = [asyncio.create_task(server.serve()) for server in http_servers]
        self._install_signal_handlers()
        await self._load_initial_models()
        await self._set_ready(True)
        log.info("node ready", extra={"grpc_port": self.settings.grpc_port})
        await self._stop.wait()
        log.info("draining")
        await self._set_ready(False)
        self.dataplane.draining.set()
        await grpc_server.stop(self.settings.drain_timeout_s)
        await self.repository.close()
        for server in http_servers:
            server.should_exit = True
        await asyncio.gather(*http_tasks)
        log.info("node stopped")

    def stop(self) -> None:
        self._stop.set()

    def _grpc_server(self) -> grpc.aio.Server:
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, reflection.SERVICE_NAME), server, pool=POOL
        )
        server.add_insecure_port(f"{self.settings.host}:{self.settings.grpc_port}")
        return server

    def _http_server(self, app: ASGIApp, port: int) -> uvicorn.Server:
        config = uvicorn.Config(
            app, host=self.settings.host, port=port, log_level="warning", lifespan="off"
        )
        return _QuietServer(config)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def _load_initial_models(self) -> None:
        names = self.repository.names_on_disk()
        if self.settings.model_control_mode == "explicit" and "*" not in self.settings.load_models:
            names = self.settings.load_models
        for name in names:
            try:
                await self.repository.load(name)
            except KapiError as exc:  # one bad model must not keep the others down
                log.error("model failed to load", extra={"model": name, "reason": exc.message})

    async def _set_ready(self, ready: bool) -> None:
        self.dataplane.ready = ready
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
