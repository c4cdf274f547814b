"""The node process: OIP gRPC, health HTTP and metrics HTTP on one event loop.

Start: every port is bound first, so a port in use is one clear error before any model
loads. SIGTERM or SIGINT drains in phases, so no request that was accepted is cancelled:
1. the node reports not ready;
2. the listeners stay up; new requests get UNAVAILABLE, open streams end once answered,
   and the requests in flight finish; this lasts until none is in flight and none has
   arrived for DRAIN_QUIET_S (up to drain_timeout_s);
3. the gRPC server stops;
4. the models unload, with a bounded wait on their runtimes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from kapi.core._generated._pool import POOL
from kapi.core.errors import KapiError, NotFound
from kapi.core.hardware import detect_profiles
from kapi.core.health import ReadinessHealth
from kapi.core.listen import StartupError, bind, http_server
from kapi.core.metrics import metrics_app
from kapi.core.oip import HTTP_PORT_EXTENSION, PROFILE_EXTENSION
from kapi.node.dataplane import DataPlane
from kapi.node.follower import Follower, Target
from kapi.node.grpc_service import SERVICE, InferenceServicer
from kapi.node.http import rest_app
from kapi.node.registration import Registrar
from kapi.node.repository import ModelRepository
from kapi.node.settings import NodeSettings
from kapi.node.stats import NodeMetrics
from kapi.repository.client import RepositoryClient

log = logging.getLogger(__name__)
# How long stopping the gRPC server waits for calls other than inference (metadata, a
# stream's last write) once the requests in flight are done.
GRPC_STOP_GRACE_S = 5.0
# A drain ends once requests have stopped arriving for this long (and none is in flight).
DRAIN_QUIET_S = 0.5


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
            settings.strict_readiness,
        )
        self.profiles = detect_profiles()
        self.dataplane.profile_extensions = tuple(f"{PROFILE_EXTENSION}{p}" for p in self.profiles)
        self.health = ReadinessHealth(SERVICE.full_name, lambda: self.dataplane.ready)
        self._stop = asyncio.Event()
        self.follower = self._follower() if settings.repository else None
        self.registrar = self._registrar()

    def _registrar(self) -> Registrar | None:
        """What keeps this node registered with the gateway it dials, if any."""
        settings = self.settings
        if settings.register_with is None:
            return None
        address = settings.advertise_address or f"{settings.host}:{settings.grpc_port}"
        return Registrar(
            settings.register_with,
            address,
            self.profiles[0] if self.profiles else None,
            settings.registration_lease_s,
            settings.gateway_token,
        )

    def _follower(self) -> Follower:
        settings = self.settings
        assert settings.repository is not None
        if not settings.serve:
            raise StartupError("--repository needs --serve MODEL@ALIAS[,MODEL@ALIAS...]")
        targets = [Target.parse(item) for entry in settings.serve for item in entry.split(",")]
        client = RepositoryClient(settings.repository, settings.repository_token)
        follower = Follower(
            client, targets, settings.cache_dir, self.repository, self.profiles, self.registry
        )
        self.repository.root = follower.models_dir
        follower.models_dir.mkdir(parents=True, exist_ok=True)
        return follower

    async def run(self) -> None:
        if not self.repository.root.is_dir():
            raise StartupError(f"the model repository {self.repository.root} is not a directory")
        grpc_server = self._grpc_server()
        sockets = [bind(self.settings.host, self.settings.http_port, "HTTP")]
        sockets.append(bind(self.settings.host, self.settings.metrics_port, "metrics"))
        # Where its REST API listens, so a gateway that knows its gRPC address finds it.
        http_port = sockets[0].getsockname()[1]
        self.dataplane.profile_extensions += (f"{HTTP_PORT_EXTENSION}{http_port}",)
        http_servers = [
            http_server(rest_app(self.dataplane, self.settings.max_message_bytes)),
            http_server(metrics_app(self.registry)),
        ]
        await self.health.announce()  # NOT_SERVING until the models load (grpcio starts at SERVING)
        await grpc_server.start()
        following: asyncio.Task[None] | None = None
        registering: asyncio.Task[None] | None = None
        http_tasks = [
            asyncio.create_task(server.serve(sockets=[sock]))
            for server, sock in zip(http_servers, sockets, strict=True)
        ]
        try:
            self._install_signal_handlers()
            if self.follower is not None:
                await self.follower.start()
                following = asyncio.create_task(self.follower.run())
                following.add_done_callback(_follower_ended)
            else:
                await self._load_initial_models()
            if not self._stop.is_set():  # a signal during the loads: straight to the drain
                self.dataplane.serving = True
                await self.health.announce()
                log.info("node serving", extra={"grpc_port": self.settings.grpc_port})
                if self.registrar is not None:
                    registering = asyncio.create_task(self.registrar.run())
                await self._stop.wait()
            if self.registrar is not None:  # out of the gateway's pool before the drain
                if registering is not None:
                    registering.cancel()
                await self.registrar.leave()
            await self._drain(grpc_server)
        finally:
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            await grpc_server.stop(0)
            await self.repository.close()
            self.dataplane.shared_memory.close()
            for server in http_servers:
                server.should_exit = True
            await asyncio.gather(*http_tasks, return_exceptions=True)
            for sock in sockets:
                sock.close()
        log.info("node stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _drain(self, grpc_server: grpc.aio.Server) -> None:
        log.info("draining")
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.dataplane.draining.set()
        await self.health.announce()
        if not await self.dataplane.wait_quiet(DRAIN_QUIET_S, self.settings.drain_timeout_s):
            log.warning("drain timeout: stopping with requests in flight or still arriving")
        grace = min(GRPC_STOP_GRACE_S, max(deadline - time.monotonic(), 0.1))
        await grpc_server.stop(grace)

    def _grpc_server(self) -> grpc.aio.Server:
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # grpcio shares a port by default, so a second node would silently take half
                # the traffic; as Triton, only when asked (--reuse-grpc-port).
                ("grpc.so_reuseport", int(self.settings.reuse_grpc_port)),
            ]
        )
        InferenceServicer(self.dataplane).add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE.full_name, reflection.SERVICE_NAME), server, pool=POOL
        )
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen for gRPC on {address}: the address is already in use or not "
                "available (another node? --reuse-grpc-port true shares it on purpose)"
            ) from exc
        return server

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def _load_initial_models(self) -> None:
        names = self.repository.names_on_disk()
        if self.settings.model_control_mode == "explicit" and "*" not in self.settings.load_models:
            names = self.settings.load_models
        for name in names:
            if self._stop.is_set():
                return
            if self.repository.is_ready(name):  # loaded already, for an ensemble
                continue
            try:
                await self.repository.load(name)
            except NotFound as exc:  # asked for by name and not there: strict readiness sees it
                self.repository.record_failure(name, exc.message)
            except KapiError:  # logged; one bad model keeps no other down
                pass


def _follower_ended(task: asyncio.Task[None]) -> None:
    """The follower runs until the node stops; it ending otherwise is a bug, said loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("the repository follower stopped", exc_info=task.exception())
