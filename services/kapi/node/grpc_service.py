"""The OIP gRPC servicer: converts protobuf to kapi's types and delegates to the data plane."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core._generated.inference import grpc_service_pb2_grpc as pb_grpc
from kapi.core.errors import InternalError, InvalidArgument, KapiError, Unimplemented
from kapi.core.oip import request_from_proto, response_to_proto
from kapi.node.dataplane import DataPlane
from kapi.node.runtimes import TensorSpec
from kapi.node.stats import Duration, ModelStats

log = logging.getLogger(__name__)
Response = TypeVar("Response")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]


def as_status(error: Exception) -> KapiError:
    """The KapiError an exception crosses the wire as; unknown ones become INTERNAL."""
    if isinstance(error, KapiError):
        return error
    log.exception("unexpected error", exc_info=error)
    return InternalError(f"{type(error).__name__}: {error}")


def rpc(handler: Handler[Response]) -> Handler[Response]:
    """Map kapi errors onto gRPC status codes, in one place."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            error = as_status(exc)
            await context.abort(error.grpc_status, error.message)
            raise  # unreachable: abort raises

    return wrapper


def _unimplemented(feature: str) -> Any:  # typed as each RPC it stands for
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented(f"{feature} is not supported by kapi; send tensors in the request")

    return rpc(handler)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    SystemSharedMemoryStatus = _unimplemented("system shared memory")
    SystemSharedMemoryRegister = _unimplemented("system shared memory")
    SystemSharedMemoryUnregister = _unimplemented("system shared memory")
    CudaSharedMemoryStatus = _unimplemented("CUDA shared memory")
    CudaSharedMemoryRegister = _unimplemented("CUDA shared memory")
    CudaSharedMemoryUnregister = _unimplemented("CUDA shared memory")
    TraceSetting = _unimplemented("tracing")
    LogSettings = _unimplemented("log settings")

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @rpc
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live)

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
        versions, platform, inputs, outputs = self.dataplane.model_metadata(
            request.name, request.version
        )
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=versions,
            platform=platform,
            inputs=[_tensor_metadata(spec) for spec in inputs],
            outputs=[_tensor_metadata(spec) for spec in outputs],
        )

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(self.dataplane.model_config(request.name, request.version))
        return response

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        response = await self.dataplane.infer(request_from_proto(request))
        return response_to_proto(response)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently (so they can batch); each response
        carries its request's id, and an error travels in error_message, as in Triton.
        When the node drains, the stream reads no more requests, answers those in flight
        and ends with UNAVAILABLE, so the client knows to send the rest elsewhere and an
        idle open stream does not hold up the node's exit."""
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        reading, cut_short = True, False
        read_error: KapiError | None = None

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await self.dataplane.infer(request_from_proto(request))
                results.put_nowait(
                    pb.ModelStreamInferResponse(infer_response=response_to_proto(response))
                )
            except Exception as exc:
                message = pb.ModelStreamInferResponse(error_message=as_status(exc).message)
                message.infer_response.id = request.id
                message.infer_response.model_name = request.model_name
                results.put_nowait(message)

        async def read_all() -> None:
            nonlocal reading, read_error
            try:
                async for request in requests:
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except asyncio.CancelledError:
                if not cut_short:  # torn down, not drained
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            except Exception as exc:  # a message that does not decode, a broken stream
                read_error = InvalidArgument(f"the stream could not be read: {exc}")
            finally:
                reading = False
            try:
                await asyncio.gather(*tasks)
            finally:
                results.put_nowait(None)

        def cut(drained: asyncio.Task[bool]) -> None:
            nonlocal cut_short
            if reading and not drained.cancelled():
                cut_short = True
                reader.cancel()

        reader = asyncio.create_task(read_all())
        drain = asyncio.create_task(self.dataplane.draining.wait())
        drain.add_done_callback(cut)
        try:
            while (message := await results.get()) is not None:
                yield message
        finally:
            drain.cancel()
            reader.cancel()
            for task in list(tasks):
                task.cancel()
        if read_error is not None:
            await context.abort(read_error.grpc_status, read_error.message)
        if cut_short:
            # A request read just as the drain began may not have been run: the client is to
            # resend whatever got no response.
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the node is draining: this stream takes no more requests; requests on it "
                "that got no response were not run, send them again to another node",
            )

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for name, version, stats in self.dataplane.statistics(request.name, request.version):
            _fill_statistics(response.model_stats.add(name=name, version=version), stats)
        return response

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for row in self.dataplane.index(request.ready):
            response.models.add(
                name=row.name, version=row.version, state=row.state, reason=row.reason
            )
        return response

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self.dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape
    )


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count, target.ns = source.count, source.ns


def _fill_statistics(target: pb.ModelStatistics, stats: ModelStats) -> None:
    target.last_inference = stats.last_inference_ms
    target.inference_count = stats.inference_count
    target.execution_count = stats.execution_count
    infer = target.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(infer, field), getattr(stats, field))
    for size in sorted(stats.batches):
        durations = stats.batches[size]
        batch = target.batch_stats.add(batch_size=size)
        _duration(batch.compute_input, durations.compute_input)
        _duration(batch.compute_infer, durations.compute_infer)
        _duration(batch.compute_output, durations.compute_output)
