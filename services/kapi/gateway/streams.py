"""ModelStreamInfer through the gateway: a client stream forwarded to one backend at a time.

Each request on the stream is routed as a unary one would be for its version (a split
draws per request); the stream sticks to the backend chosen for its first request.

Answers are counted against requests (one answer each, as Triton answers a model that is
not decoupled). The requests sent and not yet answered are kept, so that when the backend
ends the stream early the gateway knows what is lost:
- the backend drained (a kapi node ends its streams so, saying the unanswered requests were
  not run), or ended the stream with every request answered, or could not be reached with
  none outstanding: the stream goes on at another backend, the unanswered requests first;
- anything else with requests unanswered: the client's stream ends with the error, as no
  one can say whether they ran.
A model that answers more than once per request (decoupled) makes the count meaningless:
such a stream never moves.

When the gateway drains, a stream takes no more requests from its client, lets the backend
answer what it has, and ends: OK when the client had finished, else UNAVAILABLE saying the
requests without an answer were not run. The client's requests wait in a bounded queue, so
a client that sends faster than its backend answers is held back by gRPC flow control.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

import grpc

from kapi.core.errors import KapiError
from kapi.gateway import forward  # which imports this module only when a stream opens
from kapi.gateway.backends import Backend
from kapi.gateway.wire import read_routing, rewrite

if TYPE_CHECKING:
    from kapi.gateway.forward import Forwarder

# Requests read from a client and not yet sent.
STREAM_WINDOW = 64
# How a kapi node begins the status it ends a stream with when it drains.
NODE_DRAINED = "the node is draining"
GATEWAY_DRAINED = (
    "the gateway is draining: this stream takes no more requests; requests on it that got "
    "no response were not run, send them again"
)
_END = object()  # the client is done
_WAKE = object()  # look again at the drain flag


class Stream:
    def __init__(
        self,
        forwarder: Forwarder,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.forwarder = forwarder
        self.requests = requests
        self.context = context
        self.incoming: asyncio.Queue[object] = asyncio.Queue(STREAM_WINDOW)
        self.resend: collections.deque[bytes] = collections.deque()  # first, in order
        self.client_done = False
        self.draining = False

    def drain(self) -> None:
        self.draining = True
        with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes its reader anyway
            self.incoming.put_nowait(_WAKE)

    async def run(self) -> AsyncGenerator[bytes, None]:
        reader = asyncio.create_task(self._read())
        tried: list[Backend] = []
        try:
            while not (self.client_done and not self.resend):
                first = await self._next()
                if first is None:  # the client is done, or the gateway drains
                    break
                self.resend.appendleft(first)
                fields = read_routing(first)
                version = self.forwarder.router.version(fields.model_name, fields.model_version)
                backend = await self.forwarder.choose(fields, version, tried, self.context)
                moved = False
                async with contextlib.aclosing(self._on(backend)) as answers:
                    async for answer in answers:
                        if answer is None:
                            moved = True
                            break
                        yield answer
                if not moved:
                    break
                tried = [backend]  # it went away: any other, then it again
                self.forwarder.metrics.retries.labels(fields.model_name).inc()
            if self.draining and not self.client_done:
                await self.context.abort(grpc.StatusCode.UNAVAILABLE, GATEWAY_DRAINED)
        except KapiError as exc:
            await self.context.abort(exc.grpc_status, exc.message)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self) -> None:
        try:
            async for request in self.requests:
                await self.incoming.put(request)
        finally:
            await self.incoming.put(_END)

    async def _next(self) -> bytes | None:
        """The next request to send: one to resend, else the client's; None once there is
        none to come (the client is done) or the gateway drains."""
        while True:
            if self.draining:
                return None
            if self.resend:
                return self.resend.popleft()
            if self.client_done:
                return None
            item = await self.incoming.get()
            if item is _END:
                self.client_done = True
            elif item is not _WAKE:
                assert isinstance(item, bytes)
                if self.draining:  # read, never sent: it goes back, unanswered
                    self.resend.appendleft(item)
                    return None
                return item

    async def _on(self, backend: Backend) -> AsyncGenerator[bytes | None, None]:
        """Forward on `backend`: its answers, then None when the stream is to go on at
        another backend; returns when the stream is over."""
        forwarder = self.forwarder
        call = backend.stream("ModelStreamInfer")(
            timeout=self.context.time_remaining(),
            metadata=forward.forwarded_metadata(self.context),
        )
        sent: collections.deque[bytes] = collections.deque()  # sent, not yet answered
        countable = True

        async def write() -> None:
            while (item := await self._next()) is not None:
                fields = read_routing(item)
                version = forwarder.router.version(fields.model_name, fields.model_version)
                payload = rewrite(item, fields, None if fields.model_version else version)
                sent.append(item)  # counted before the write: a write may land and fail
                await call.write(payload)
            await call.done_writing()

        backend.outstanding += 1
        backend.requests += 1
        writer = asyncio.create_task(write())
        try:
            while True:
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as exc:
                    details = exc.details() or ""
                    unavailable = exc.code() is grpc.StatusCode.UNAVAILABLE
                    if unavailable and countable and (details.startswith(NODE_DRAINED) or not sent):
                        forwarder.turned_away(backend, exc)
                        self.resend.extendleft(reversed(sent))  # not run: sent again first
                        yield None
                        return
                    await self.context.abort(exc.code(), details)
                if response is grpc.aio.EOF:
                    if self.client_done and not self.resend:
                        return
                    if countable and not sent:  # it ended the stream, every request answered
                        forwarder.prober.probe_soon(backend)
                        yield None
                        return
                    await self.context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"backend {backend.address} ended the stream with {len(sent)} "
                        "request(s) unanswered",
                    )
                if sent:
                    sent.popleft()
                else:  # more answers than requests: a decoupled model
                    countable = False
                yield response
        finally:
            backend.outstanding -= 1
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, KapiError):
                await writer
            call.cancel()
