"""The OIP gRPC servicer: converts protobuf to kapi's types and delegates to the data plane.

Requests reach it as bytes and are parsed here, so a message that does not parse is
INVALID_ARGUMENT with the reason, as any other malformed request is.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import InvalidArgument, Unimplemented, as_kapi_error
from kapi.core.inference import Parameter
from kapi.core.oip import parse, request_from_proto, response_to_proto
from kapi.node import responses
from kapi.node.dataplane import DataPlane
from kapi.node.streams import answer_stream

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]


def rpc(handler: Handler[Response]) -> Handler[Response]:
    """Map kapi errors onto gRPC status codes, in one place."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            error = as_kapi_error(exc)
            await context.abort(error.grpc_status, error.message)
            raise  # unreachable: abort raises

    return wrapper


def _unimplemented(feature: str) -> Any:  # typed as each RPC it stands for
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented(f"{feature} is not supported by this node")

    return rpc(handler)


class InferenceServicer:
    CudaSharedMemoryStatus = _unimplemented("CUDA shared memory")
    CudaSharedMemoryRegister = _unimplemented("CUDA shared memory")
    CudaSharedMemoryUnregister = _unimplemented("CUDA shared memory")
    TraceSetting = _unimplemented("tracing")
    LogSettings = _unimplemented("log settings")

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register every RPC with requests left as bytes (parsed by `parse`)."""
        handlers = {}
        for method in SERVICE.methods:
            serialize = getattr(pb, method.output_type.name).SerializeToString
            behaviour = getattr(self, method.name)
            if method.client_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    behaviour, response_serializer=serialize
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    functools.partial(self._parsed, behaviour, getattr(pb, method.input_type.name)),
                    response_serializer=serialize,
                )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        server.add_registered_method_handlers(SERVICE.full_name, handlers)

    async def _parsed(
        self,
        behaviour: Handler[Any],
        message_type: type[Message],
        data: bytes,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        try:
            request = parse(message_type, data)
        except InvalidArgument as exc:
            await context.abort(exc.grpc_status, exc.message)
        return await behaviour(request, context)  # type: ignore[call-arg]

    @rpc
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # answering at all is being live

    @rpc
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self.dataplane.model_ready(request.name, request.version)
        )

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        name, version, extensions = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        return responses.model_metadata(self.dataplane, request.name, request.version)

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        return responses.model_config(self.dataplane, request.name, request.version)

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        limits = self.dataplane.request_limits(request.model_name, request.model_version)
        response = await self.dataplane.infer(request_from_proto(request, limits))
        return response_to_proto(response)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently (so they can batch) and are answered in
        their order, as Triton answers a model that is not decoupled (streams.py)."""
        parsed = (parse(pb.ModelInferRequest, data) async for data in requests)
        async for message in answer_stream(self.dataplane, parsed, context):
            yield message

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        return responses.statistics(self.dataplane, request.name, request.version)

    @rpc
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.dataplane.shared_memory.status(request.name):
            entry = response.regions[region.name]
            entry.name, entry.key = region.name, region.key
            entry.offset, entry.byte_size = region.offset, region.byte_size
        return response

    @rpc
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.dataplane.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.dataplane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        _check_repository_name(request.repository_name)
        return responses.repository_index(self.dataplane, request.ready)

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository_name(request.repository_name)
        await self.dataplane.load(request.model_name, _repository_parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository_name(request.repository_name)
        await self.dataplane.unload(request.model_name, _repository_parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def _repository_parameters(parameters: Any) -> dict[str, Parameter | bytes]:
    """A ModelRepositoryParameter map as plain Python values (file contents as bytes)."""
    return {
        key: getattr(value, choice)
        for key, value in parameters.items()
        if (choice := value.WhichOneof("parameter_choice")) is not None
    }


def _check_repository_name(name: str) -> None:
    if name:  # Triton's words
        raise Unimplemented("'repository_name' specification is not supported")
