"""Forwarding ModelInfer as bytes, with retries (streams: streams.py).

A request stays the bytes the client sent: the wire reader finds the routing fields and the
tensors are never decoded (wire.py). The deadline passes through as the remaining time; the
client's metadata passes through as it came.

Retries: UNAVAILABLE means the request was not run where it went: the backend could not be
reached (refused, reset before an answer), is draining, or turned it away (a full queue).
Such a request goes to another backend while the retry budget allows. A backend that could
not be reached is out of rotation until a probe finds it ready; one that turned a request
away is only probed at once. Any other answer, error or not, is the backend's and reaches
the client with its code and message unchanged, and is never sent again. A node killed
while it runs a request answers UNAVAILABLE too (the connection resets): that request is
retried: a lost connection cannot say whether it ran.
"""

from __future__ import annotations

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
# Words in an UNAVAILABLE's details that say the backend could not be reached at all.
_TRANSPORT = (
    "failed to connect", "connection refused", "connection reset", "socket closed",
    "broken pipe", "connections to all backends failing", "recvmsg", "sendmsg", "goaway",
)  # fmt: skip


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

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        self.last_change = time.monotonic()


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
        self.streams: set[Any] = set()  # the open streams (streams.Stream), told of a drain

    def drain(self) -> None:
        """Refuse new requests; open streams end at their next request boundary."""
        self.draining = True
        for stream in list(self.streams):
            stream.drain()

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
            backend = await self.choose(fields, version, tried, context)
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
                    self.turned_away(backend, exc)
                    tried.append(backend)
                    if self.budget.withdraw() and self.router.can_route(
                        fields.model_name, version, fields.parameters, tried
                    ):
                        self.metrics.retries.labels(fields.model_name).inc()
                        continue
                elif code in _BACKEND_FAULTS:
                    self.prober.failed(backend, exc.details() or code.name)
                elif code is grpc.StatusCode.NOT_FOUND:
                    self.prober.probe_soon(backend)  # it may no longer serve the model
                self.metrics.answered(
                    fields.model_name,
                    _label(backend, fields.model_name, version),
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
                _label(backend, fields.model_name, version),
                backend.address,
                "OK",
                time.perf_counter() - started,
            )
            self.shadowing.maybe_mirror(fields, payload, response, backend)
            return response

    async def choose(
        self,
        fields: RoutingFields,
        version: str | None,
        tried: Sequence[Backend],
        context: grpc.aio.ServicerContext,
    ) -> Backend:
        """The router's choice, or the client's call aborted with the router's error."""
        try:
            return self.router.choose(fields.model_name, version, fields.parameters, tried)
        except KapiError as exc:
            await context.abort(exc.grpc_status, exc.message)
            raise  # unreachable

    def turned_away(self, backend: Backend, error: grpc.aio.AioRpcError) -> None:
        """An UNAVAILABLE from `backend`: unreachable, or only this request turned away."""
        details = error.details() or ""
        if any(sign in details.lower() for sign in _TRANSPORT):
            self.prober.unreachable(backend, details)
        else:
            self.prober.probe_soon(backend)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        from kapi.gateway.streams import Stream

        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        self.in_flight.enter()
        stream = Stream(self, requests, context)
        self.streams.add(stream)
        try:
            async with contextlib.aclosing(stream.run()) as responses:
                async for response in responses:
                    yield response
        finally:
            self.streams.discard(stream)
            self.in_flight.leave()


def _label(backend: Backend, model: str, version: str | None) -> str:
    """The version label of a request's metrics: only versions a backend has, so a client
    cannot grow the label set without bound."""
    if not version:
        return ""
    return version if backend.serves(model, version) else "other"
