"""Forwarding inference: ModelInfer and ModelStreamInfer, as bytes, with retries.

A request stays the bytes the client sent: the wire reader finds the routing fields and the
tensors are never decoded (wire.py). The deadline passes through as the remaining time; the
client's metadata passes through as it came.

Retries: a request that could not reach a backend (UNAVAILABLE: refused, reset, draining)
goes to another backend while the retry budget allows. Any other answer, error or not, is
the backend's and reaches the client with its code and message unchanged: a request that
may have reached a model is never sent twice.

A stream sticks to one backend. When that backend goes away (UNAVAILABLE, or it ends the
stream while the client still sends, as a draining node does once it has answered), the
stream continues on another backend, provided every request sent so far has its answer;
otherwise the client's stream ends with the backend's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from kapi.core.errors import KapiError
from kapi.gateway.backends import Backend
from kapi.gateway.health import Prober
from kapi.gateway.metrics import GatewayMetrics
from kapi.gateway.retry import RetryBudget
from kapi.gateway.router import Router
from kapi.gateway.shadow import Shadowing
from kapi.gateway.wire import RoutingFields, read_routing, rewrite

log = logging.getLogger(__name__)
# Codes that count against a backend's health (consecutive failures eject it).
_BACKEND_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
_END = object()


def forwarded_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    """The client's metadata, less what gRPC itself sets on every call."""
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith((":", "grpc-")) and key not in ("user-agent", "te", "content-type")
    )


class InFlight:
    """Requests being forwarded now, so a draining gateway knows when it is done."""

    def __init__(self) -> None:
        self.count = 0
        self.last_change = time.monotonic()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        self.last_change = time.monotonic()
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class Forwarder:
    def __init__(
        self,
        router: Router,
        prober: Prober,
        metrics: GatewayMetrics,
        shadowing: Shadowing,
        budget: RetryBudget | None = None,
    ) -> None:
        self.router = router
        self.prober = prober
        self.metrics = metrics
        self.shadowing = shadowing
        self.budget = budget or RetryBudget()
        self.in_flight = InFlight()
        self.draining = False

    async def model_infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        self.in_flight.enter()
        try:
            return await self._infer(data, context)
        finally:
            self.in_flight.leave()

    async def _infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        try:
            fields = read_routing(data)
            version = self.router.version(fields.model_name, fields.model_version)
            payload = rewrite(data, fields, None if fields.model_version else version)
        except KapiError as exc:
            await context.abort(exc.grpc_status, exc.message)
        metadata = forwarded_metadata(context)
        tried: list[Backend] = []
        self.budget.deposit()
        while True:
            backend = await self._choose(fields, version, tried, context)
            backend.outstanding += 1
            backend.requests += 1
            sent = time.perf_counter()
            try:
                response: bytes = await backend.unary("ModelInfer")(
                    payload, timeout=context.time_remaining(), metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.UNAVAILABLE:
                    self.prober.unreachable(backend, exc.details() or "")
                    tried.append(backend)
                    if self.budget.withdraw() and self._others(fields, version, tried):
                        self.metrics.retries.labels(fields.model_name).inc()
                        continue
                elif code in _BACKEND_FAULTS:
                    self.prober.failed(backend, exc.details() or code.name)
                elif code is grpc.StatusCode.NOT_FOUND:
                    self.prober.probe_soon(backend)  # it may no longer serve the model
                self.metrics.answered(
                    fields.model_name,
                    version or "",
                    backend.address,
                    code.name,
                    time.perf_counter() - started,
                )
                await context.abort(code, exc.details() or "")
            finally:
                backend.outstanding -= 1
            backend.observe(fields.model_name, time.perf_counter() - sent)
            self.metrics.answered(
                fields.model_name,
                version or "",
                backend.address,
                "OK",
                time.perf_counter() - started,
            )
            self.shadowing.maybe_mirror(fields, payload, response, backend)
            return response

    async def _choose(
        self,
        fields: RoutingFields,
        version: str | None,
        tried: Sequence[Backend],
        context: grpc.aio.ServicerContext,
    ) -> Backend:
        try:
            return self.router.choose(fields.model_name, version, fields.parameters, tried)
        except KapiError as exc:
            await context.abort(exc.grpc_status, exc.message)
            raise  # unreachable

    def _others(self, fields: RoutingFields, version: str | None, tried: Sequence[Backend]) -> bool:
        try:
            self.router.choose(fields.model_name, version, fields.parameters, tried)
        except KapiError:
            return False
        return True

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        self.in_flight.enter()
        try:
            async for response in _Stream(self, requests, context).run():
                yield response
        finally:
            self.in_flight.leave()


class _Stream:
    """One client stream forwarded to one backend at a time."""

    def __init__(
        self,
        forwarder: Forwarder,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.forwarder = forwarder
        self.requests = requests
        self.context = context
        self.incoming: asyncio.Queue[object] = asyncio.Queue()
        self.held: object | None = None  # a request taken from the queue, not yet sent

    async def run(self) -> AsyncIterator[bytes]:
        reader = asyncio.create_task(self._read())
        tried: list[Backend] = []
        try:
            while True:
                first = self.held if self.held is not None else await self.incoming.get()
                self.held = first
                if first is _END:
                    return
                assert isinstance(first, bytes)
                fields = read_routing(first)
                version = self.forwarder.router.version(fields.model_name, fields.model_version)
                backend = await self.forwarder._choose(fields, version, tried, self.context)
                ended_cleanly = False
                async for item in self._on(backend, version):
                    if item is None:
                        ended_cleanly = True
                        break
                    yield item
                if ended_cleanly:
                    return
                tried = [backend]  # it went away: any other, then it again
                self.forwarder.metrics.retries.labels(fields.model_name).inc()
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

    async def _on(self, backend: Backend, version: str | None) -> AsyncIterator[bytes | None]:
        """Forward on `backend` until the client is done (then None) or the backend goes away
        with every request answered (then it returns, for the next backend)."""
        forwarder = self.forwarder
        call = backend.stream("ModelStreamInfer")(
            timeout=self.context.time_remaining(), metadata=forwarded_metadata(self.context)
        )
        outstanding = 0
        client_done = False
        backend.outstanding += 1
        backend.requests += 1

        async def write() -> None:
            nonlocal outstanding, client_done
            while True:
                item = self.held if self.held is not None else await self.incoming.get()
                self.held = item
                if item is _END:
                    client_done = True
                    await call.done_writing()
                    return
                assert isinstance(item, bytes)
                fields = read_routing(item)
                chosen = fields.model_version or version
                payload = rewrite(item, fields, None if fields.model_version else chosen)
                await call.write(payload)
                self.held = None
                outstanding += 1

        writer = asyncio.create_task(write())
        try:
            while True:
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.UNAVAILABLE and outstanding == 0:
                        forwarder.prober.unreachable(backend, exc.details() or "")
                        return  # nothing lost: go on elsewhere
                    await self.context.abort(exc.code(), exc.details() or "")
                if response is grpc.aio.EOF:
                    if client_done:
                        yield None
                        return
                    if outstanding == 0:  # the backend ended the stream (draining)
                        forwarder.prober.probe_soon(backend)
                        return
                    await self.context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"backend {backend.address} ended the stream with "
                        f"{outstanding} request(s) unanswered",
                    )
                outstanding -= 1
                yield response
        finally:
            backend.outstanding -= 1
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await writer
            call.cancel()
