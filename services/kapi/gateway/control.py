"""The gateway's OIP service: every RPC of `inference.GRPCInferenceService`.

Inference is forwarded as bytes (forward.py). The rest is answered from the backends:
- ServerLive: the gateway itself; ServerReady: not draining, and some backend healthy.
- ServerMetadata: the gateway's own name and version, with the extensions every healthy
  backend has (shared memory is a node's own, so never through the gateway).
- ModelReady, ModelMetadata, ModelConfig: forwarded to a backend that serves the model.
- ModelStatistics: every backend's, summed per model and version.
- RepositoryIndex: every healthy backend's, one entry per (model, version, state).
- RepositoryModelLoad / Unload: forwarded to every backend whose repository has the model.
Shared memory, tracing and log settings are refused, naming what to use instead.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

import kapi
from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import KapiError, NotFound, Unimplemented
from kapi.core.oip import parse
from kapi.gateway.backends import Backend
from kapi.gateway.forward import Forwarder, forwarded_metadata
from kapi.gateway.health import Prober
from kapi.gateway.router import Router

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVER_NAME = "kapi-gateway"
CONTROL_TIMEOUT_S = 30.0
_NOT_THROUGH_GATEWAY = ("shared_memory", "cuda_shared_memory", "system_shared_memory")
_LAST_INFERENCE = "last_inference"
KAPI_EXTENSIONS = "kapi-"  # a node's own entries (profiles, REST port): not the gateway's

Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def _rpc(handler: Callable[[Any, bytes, grpc.aio.ServicerContext], Awaitable[bytes]]) -> Any:
    """kapi errors and backend errors as the client's status, in one place."""

    @functools.wraps(handler)
    async def wrapper(self: Any, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await handler(self, data, context)
        except KapiError as exc:
            await context.abort(exc.grpc_status, exc.message)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        raise AssertionError("unreachable")  # abort raises

    return wrapper


def _refused(feature: str, instead: str) -> Any:
    async def unimplemented(self: Any, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{feature} is not supported through the gateway: {instead}",
        )
        raise AssertionError("unreachable")

    return unimplemented


_SHM = "register shared memory with the node itself (a region lives on one machine)"


class GatewayServicer:
    SystemSharedMemoryStatus = _refused("system shared memory", _SHM)
    SystemSharedMemoryRegister = _refused("system shared memory", _SHM)
    SystemSharedMemoryUnregister = _refused("system shared memory", _SHM)
    CudaSharedMemoryStatus = _refused("CUDA shared memory", _SHM)
    CudaSharedMemoryRegister = _refused("CUDA shared memory", _SHM)
    CudaSharedMemoryUnregister = _refused("CUDA shared memory", _SHM)
    TraceSetting = _refused("tracing", "set it on each backend")
    LogSettings = _refused("log settings", "set them on each backend")

    def __init__(self, forwarder: Forwarder, router: Router, prober: Prober) -> None:
        self.forwarder = forwarder
        self.router = router
        self.prober = prober

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Every RPC with requests and responses left as bytes."""
        handlers = {}
        for method in SERVICE.methods:
            if method.name == "ModelInfer":
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self.forwarder.model_infer
                )
            elif method.name == "ModelStreamInfer":
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self.forwarder.model_stream_infer
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    getattr(self, method.name)
                )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        server.add_registered_method_handlers(SERVICE.full_name, handlers)

    @property
    def ready(self) -> bool:
        return not self.forwarder.draining and any(b.healthy for b in self.router.pool)

    @_rpc
    async def ServerLive(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        return pb.ServerLiveResponse(live=True).SerializeToString()

    @_rpc
    async def ServerReady(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.ready).SerializeToString()

    @_rpc
    async def ServerMetadata(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=kapi_version(), extensions=self.extensions()
        ).SerializeToString()

    def extensions(self) -> list[str]:
        healthy = [b for b in self.router.pool if b.healthy and b.server_name]
        if not healthy:
            return []
        common = set(healthy[0].extensions)
        for backend in healthy[1:]:
            common &= set(backend.extensions)
        return sorted(
            ext
            for ext in common
            if not ext.startswith(KAPI_EXTENSIONS) and ext not in _NOT_THROUGH_GATEWAY
        )

    @_rpc
    async def ModelReady(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        request = parse(pb.ModelReadyRequest, data)
        try:
            backend = self.router.choose(request.name, request.version, {})
        except KapiError:  # served nowhere, or by nothing healthy: not ready
            return pb.ModelReadyResponse(ready=False).SerializeToString()
        return await self._forward(backend, "ModelReady", data, context)

    @_rpc
    async def ModelMetadata(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        request = parse(pb.ModelMetadataRequest, data)
        backend = self.router.choose(request.name, request.version, {})
        return await self._forward(backend, "ModelMetadata", data, context)

    @_rpc
    async def ModelConfig(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        request = parse(pb.ModelConfigRequest, data)
        backend = self.router.choose(request.name, request.version, {})
        return await self._forward(backend, "ModelConfig", data, context)

    async def _forward(
        self, backend: Backend, method: str, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        answer: bytes = await backend.unary(method)(
            data, timeout=_timeout(context), metadata=forwarded_metadata(context)
        )
        return answer

    @_rpc
    async def ModelStatistics(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        request = parse(pb.ModelStatisticsRequest, data)
        backends = [
            b
            for b in self.router.pool
            if b.healthy and (not request.name or b.serves(request.name, request.version))
        ]
        if request.name and not backends:
            what = f"model '{request.name}'" + (
                f" version {request.version}" if request.version else ""
            )
            raise NotFound(f"{what} is not served by any backend of this gateway")
        answers = _answered(
            await asyncio.gather(
                *(self._forward(b, "ModelStatistics", data, context) for b in backends),
                return_exceptions=True,
            )
        )
        merged: dict[tuple[str, str], Any] = {}
        for answer in answers:
            for stats in pb.ModelStatisticsResponse.FromString(answer).model_stats:
                key = (stats.name, stats.version)
                if key in merged:
                    add_statistics(merged[key], stats)
                else:
                    merged[key] = stats
        response = pb.ModelStatisticsResponse()
        for key in sorted(merged):
            response.model_stats.append(merged[key])
        return response.SerializeToString()

    @_rpc
    async def RepositoryIndex(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        request = parse(pb.RepositoryIndexRequest, data)
        if request.repository_name:  # Triton's words
            raise Unimplemented("'repository_name' specification is not supported")
        backends = [b for b in self.router.pool if b.healthy]
        answers = _answered(
            await asyncio.gather(
                *(self._forward(b, "RepositoryIndex", data, context) for b in backends),
                return_exceptions=True,
            )
        )
        seen: dict[tuple[str, str, str], Any] = {}
        for answer in answers:
            for entry in pb.RepositoryIndexResponse.FromString(answer).models:
                seen.setdefault((entry.name, entry.version, entry.state), entry)
        response = pb.RepositoryIndexResponse()
        for key in sorted(seen):
            response.models.append(seen[key])
        return response.SerializeToString()

    @_rpc
    async def RepositoryModelLoad(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        return await self._model_control("RepositoryModelLoad", data, context)

    @_rpc
    async def RepositoryModelUnload(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        return await self._model_control("RepositoryModelUnload", data, context)

    async def _model_control(
        self, method: str, data: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = parse(pb.RepositoryModelLoadRequest, data)  # Unload's fields are the same
        having = await self.backends_having(request.model_name)
        results = await asyncio.gather(
            *(self._forward(b, method, data, context) for b in having), return_exceptions=True
        )
        await self.refresh(having)
        for backend, result in zip(having, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                await context.abort(
                    result.code(), f"backend {backend.address}: {result.details() or ''}"
                )
            if isinstance(result, BaseException):
                raise result
        return pb.RepositoryModelLoadResponse().SerializeToString()

    async def backends_having(self, name: str) -> list[Backend]:
        """The healthy backends whose repository has model `name`, loaded or not."""
        index = pb.RepositoryIndexRequest().SerializeToString()
        backends = [b for b in self.router.pool if b.healthy]
        listings = await asyncio.gather(
            *(b.unary("RepositoryIndex")(index, timeout=CONTROL_TIMEOUT_S) for b in backends),
            return_exceptions=True,
        )
        having = [
            backend
            for backend, listing in zip(backends, listings, strict=True)
            if isinstance(listing, bytes)
            and any(m.name == name for m in pb.RepositoryIndexResponse.FromString(listing).models)
        ]
        if not having:
            raise NotFound(f"no backend of this gateway has model '{name}' in its repository")
        return having

    async def refresh(self, backends: list[Backend]) -> None:
        """What `backends` serve changed: learn it before answering."""
        for backend in backends:
            backend.stale = True
        await asyncio.gather(*(self.prober.probe(b) for b in backends))


def _answered(results: list[Any]) -> list[bytes]:
    """The answers of the backends that answered: one that fails (it went away since its
    last probe) is left out of a sum or a union, as the REST API leaves it out."""
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, grpc.aio.AioRpcError):
            raise result
    return [result for result in results if isinstance(result, bytes)]


def add_statistics(total: Any, more: Any) -> None:
    """Sum `more` into `total`, field by field (last_inference: the latest). Repeated
    batch statistics merge by batch size, response statistics by key."""
    for descriptor, value in more.ListFields():
        name = descriptor.name
        if name in ("name", "version"):
            continue
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            target_map = getattr(total, name)
            for key, item in value.items():
                if key in target_map:
                    add_statistics(target_map[key], item)
                else:
                    target_map[key].CopyFrom(item)
        elif descriptor.is_repeated:
            target = getattr(total, name)
            if name == "batch_stats":
                by_size = {entry.batch_size: entry for entry in target}
                for entry in value:
                    if entry.batch_size in by_size:
                        add_statistics(by_size[entry.batch_size], entry)
                    else:
                        target.add().CopyFrom(entry)
            else:
                target.extend(value)
        elif descriptor.message_type is not None:
            add_statistics(getattr(total, name), value)
        elif name == _LAST_INFERENCE:
            setattr(total, name, max(getattr(total, name), value))
        elif name == "batch_size":
            continue
        else:
            setattr(total, name, getattr(total, name) + value)


def _timeout(context: grpc.aio.ServicerContext) -> float:
    remaining = context.time_remaining()
    return CONTROL_TIMEOUT_S if remaining is None else min(remaining, CONTROL_TIMEOUT_S * 10)


@functools.cache
def kapi_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kapi")
    except PackageNotFoundError:
        return getattr(kapi, "__version__", "0")
