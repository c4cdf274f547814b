"""ModelStreamInfer, as Triton serves a model that is not decoupled: the requests on a stream
run concurrently (so they batch together), and their responses go out in request order.

A FIFO holds one task per request, in the order read; the writer awaits the head, writes
it, then the next. A semaphore bounds the requests read and not yet written, so a client
that sends faster than the node answers is held back by gRPC flow control instead of
filling memory. An error travels in the response's error_message, as in Triton.

When the node drains, the stream reads no more requests, answers those it has read and
ends with UNAVAILABLE, so the client knows to send the rest elsewhere and an idle open
stream does not hold up the node's exit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import InvalidArgument, KapiError, Unavailable, as_kapi_error
from kapi.core.oip import request_from_proto, response_to_proto
from kapi.node.dataplane import DataPlane

# Requests one stream may have read and not yet answered.
STREAM_WINDOW = 64
DRAINED = (
    "the node is draining: this stream takes no more requests; requests on it that got "
    "no response were not run, send them again to another node"
)


async def answer_stream(
    dataplane: DataPlane,
    requests: AsyncIterator[pb.ModelInferRequest],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    window = asyncio.Semaphore(STREAM_WINDOW)
    answers: asyncio.Queue[asyncio.Future[pb.ModelStreamInferResponse] | None] = asyncio.Queue()
    end: list[KapiError] = []  # why the stream ends early, if it does

    async def read() -> None:
        try:
            async for request in requests:
                await window.acquire()
                if dataplane.draining.is_set():  # read as the drain began: not run, no answer
                    if not end:
                        end.append(Unavailable(DRAINED))
                    break
                answers.put_nowait(_start(dataplane, request))
        except asyncio.CancelledError:
            if not end:  # torn down by gRPC, not cut short by the drain
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except Exception as exc:  # a message that does not parse, a broken stream
            reason = exc.message if isinstance(exc, KapiError) else str(exc)
            end.append(InvalidArgument(f"the stream could not be read: {reason}"))
        finally:
            answers.put_nowait(None)

    def cut(drained: asyncio.Task[bool]) -> None:
        if not drained.cancelled() and not reader.done() and not end:
            end.append(Unavailable(DRAINED))
            reader.cancel()

    reader = asyncio.create_task(read())
    drain = asyncio.create_task(dataplane.draining.wait())
    drain.add_done_callback(cut)
    try:
        while (task := await answers.get()) is not None:
            message = await task
            yield message
            window.release()
    finally:
        drain.cancel()
        reader.cancel()
        while not answers.empty():
            if (pending := answers.get_nowait()) is not None:
                pending.cancel()
    if end:
        await context.abort(end[0].grpc_status, end[0].message)


def _start(
    dataplane: DataPlane, request: pb.ModelInferRequest
) -> asyncio.Future[pb.ModelStreamInferResponse]:
    """Count the request in now, as it is read, so that a drain beginning before its task
    first runs waits for it instead of refusing it."""
    try:
        dataplane.admit()
    except KapiError as exc:
        refused: asyncio.Future[pb.ModelStreamInferResponse] = (
            asyncio.get_running_loop().create_future()
        )
        refused.set_result(_error(request, exc))
        return refused
    return asyncio.create_task(_answer(dataplane, request))


async def _answer(
    dataplane: DataPlane, request: pb.ModelInferRequest
) -> pb.ModelStreamInferResponse:
    try:
        limits = dataplane.request_limits(request.model_name, request.model_version)
        response = await dataplane.infer(request_from_proto(request, limits), admitted=True)
    except Exception as exc:
        return _error(request, as_kapi_error(exc))
    finally:
        dataplane.release()
    return pb.ModelStreamInferResponse(infer_response=response_to_proto(response))


def _error(request: pb.ModelInferRequest, error: KapiError) -> pb.ModelStreamInferResponse:
    message = pb.ModelStreamInferResponse(error_message=error.message)
    message.infer_response.id = request.id
    message.infer_response.model_name = request.model_name
    return message
