"""The KServe v2 REST API on the gateway's HTTP port, forwarded to the backends' REST APIs.

A request under `/v2/models/{name}` goes to a backend that serves the model, chosen as for
gRPC: the version in the path, else the route's split (the path then names the version
drawn); the hardware preference from the `kapi-hardware` header (a request's JSON
parameters are not read: the body is forwarded as it came, binary tensors included). A
backend's REST address is its discovery source's `http_address`, or the port a kapi node
reports (`kapi-http-port:` in ServerMetadata). A request that cannot reach a backend is
sent to another; any answer, error or not, is the backend's, status and body unchanged.

The server's own metadata, the statistics of every model and the repository index are
answered from all backends; load and unload go to each backend whose repository has the
model. Shared memory is refused: a region lives on one machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from kapi.core.errors import (
    KapiError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from kapi.gateway.backends import Backend
from kapi.gateway.control import SERVER_NAME, GatewayServicer, kapi_version
from kapi.gateway.metrics import GatewayMetrics
from kapi.gateway.router import HARDWARE_PARAMETER, Router

JSON = "application/json"
# What says a request never reached its backend (so it may go to another).
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
TIMEOUT_S = 300.0
# Request headers that are the connection's, not the request's (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-connection", "content-length",
    }
)  # fmt: skip


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type=JSON)


def _answering_errors(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except KapiError as exc:
            return _error(exc.http_status, exc.message)

    return wrapped


class RestForwarder:
    def __init__(
        self, router: Router, servicer: GatewayServicer, metrics: GatewayMetrics, max_body: int
    ) -> None:
        self.router = router
        self.servicer = servicer
        self.metrics = metrics
        self.max_body = max_body
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(TIMEOUT_S, connect=5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    def routes(self) -> list[BaseRoute]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        routes: list[BaseRoute] = [
            Route("/v2", _answering_errors(self.server_metadata), methods=["GET"]),
            Route("/v2/models/stats", _answering_errors(self.all_statistics), methods=["GET"]),
            Route("/v2/repository/index", _answering_errors(self.index), methods=["POST"]),
        ]
        for action in ("load", "unload"):
            routes.append(
                Route(
                    f"/v2/repository/models/{{name}}/{action}",
                    _answering_errors(self.model_control),
                    methods=["POST"],
                )
            )
        for prefix in (versioned, model):
            for tail in ("", "/ready", "/config", "/stats"):
                routes.append(Route(prefix + tail, _answering_errors(self.model), methods=["GET"]))
            routes.append(Route(prefix + "/infer", _answering_errors(self.model), methods=["POST"]))
        for path in ("/v2/systemsharedmemory/{rest:path}", "/v2/cudasharedmemory/{rest:path}"):
            routes.append(
                Route(path, _answering_errors(self.shared_memory), methods=["GET", "POST"])
            )
        return routes

    async def server_metadata(self, request: Request) -> Response:
        body = {
            "name": SERVER_NAME,
            "version": kapi_version(),
            "extensions": self.servicer.extensions(),
        }
        return Response(orjson.dumps(body), media_type=JSON)

    async def shared_memory(self, request: Request) -> Response:
        raise Unimplemented(
            "shared memory is not supported through the gateway: register it with the node "
            "itself (a region lives on one machine)"
        )

    async def model(self, request: Request) -> Response:
        forwarder = self.servicer.forwarder
        infer = request.method == "POST"
        if infer and forwarder.draining:
            raise Unavailable("the gateway is shutting down")
        forwarder.in_flight.enter()
        try:
            return await self._model(request, infer)
        finally:
            forwarder.in_flight.leave()

    async def _model(self, request: Request, infer: bool) -> Response:
        name = request.path_params["name"]
        asked = request.path_params.get("version", "")
        tail = request.url.path.rsplit("/", 1)[-1]
        version = self.router.version(name, asked) if infer else (asked or None)
        if tail == "stats":
            return await self._model_statistics(name, version)
        parameters: dict[str, object] = {}
        if (preference := request.headers.get(HARDWARE_PARAMETER)) is not None:
            parameters[HARDWARE_PARAMETER] = preference
        body = await self._body(request)
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
        if tail in ("ready", "config", "infer"):
            path += "/" + tail
        headers = _forwarded(request.headers.items())
        tried = self._without_rest(name)
        started = time.perf_counter()
        forwarder = self.servicer.forwarder
        forwarder.budget.deposit()
        while True:
            backend = self.router.choose(name, version, parameters, tried)
            backend.outstanding += 1
            backend.requests += 1
            try:
                response = await self._send(backend, request.method, path, body, headers, request)
            except _NOT_SENT as exc:  # it never reached the backend: another may answer
                self.servicer.prober.unreachable(backend, str(exc) or type(exc).__name__)
                tried.append(backend)
                if forwarder.budget.withdraw() and self.router.can_route(
                    name, version, parameters, tried
                ):
                    self.metrics.retries.labels(name).inc()
                    continue
                raise Unavailable(f"backend {backend.address} could not be reached: {exc}") from exc
            except httpx.TransportError as exc:  # sent, maybe run: never sent again
                raise Unavailable(f"backend {backend.address} did not answer: {exc}") from exc
            finally:
                backend.outstanding -= 1
            if response.status_code >= 500 and response.status_code != 503:
                self.servicer.prober.failed(backend, f"HTTP {response.status_code}")
            if infer:
                elapsed = time.perf_counter() - started
                code = "OK" if response.status_code < 400 else f"HTTP {response.status_code}"
                label = version if version and backend.serves(name, version) else ""
                self.metrics.answered(name, label, backend.address, code, elapsed)
                if response.status_code < 400:
                    backend.observe(name, elapsed)
            return response

    def _without_rest(self, name: str) -> list[Backend]:
        """The backends with no REST address (excluded), or UNAVAILABLE when those are all
        the backends that serve `name`."""
        without = [b for b in self.router.pool if b.http_address is None]
        serving = [b for b in self.router.pool if b.serves(name)]
        if serving and all(b in without for b in serving):
            raise Unavailable(
                f"model '{name}' is served only by backends whose REST address is unknown: "
                "use gRPC, or give them an http_address"
            )
        return without

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ResourceExhausted(
                f"the request body is {length} bytes, over this gateway's {self.max_body}"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ResourceExhausted(f"the request body is over this gateway's {self.max_body}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _model_statistics(self, name: str, version: str | None) -> Response:
        """A model's statistics, summed over every backend that serves it."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/stats"
        backends = [
            b
            for b in self.router.pool
            if b.healthy and b.http_address and b.serves(name, version or "")
        ]
        if not backends:
            what = f"model '{name}'" + (f" version {version}" if version else "")
            raise NotFound(f"{what} is not served by any backend of this gateway")
        body = _merged(await self._each("GET", path, b"", backends))
        return Response(orjson.dumps(body), media_type=JSON)

    async def _send(
        self,
        backend: Backend,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        request: Request,
    ) -> Response:
        url = f"http://{backend.http_address}{path}"
        upstream = self.client.build_request(
            method, url, content=body, headers=headers, params=request.query_params
        )
        answer = await self.client.send(upstream, stream=True)
        try:
            raw = b"".join([chunk async for chunk in answer.aiter_raw()])
        finally:
            await answer.aclose()
        response = Response(raw, status_code=answer.status_code)
        del response.headers["content-length"]  # the backend's own, below
        for key, value in answer.headers.multi_items():
            if key.lower() not in _HOP_BY_HOP or key.lower() == "content-length":
                response.headers.append(key, value)
        return response

    async def _each(
        self, method: str, path: str, body: bytes, backends: list[Backend] | None = None
    ) -> list[Any]:
        """Every healthy REST backend's JSON answer (a backend that fails is left out)."""
        if backends is None:
            backends = [b for b in self.router.pool if b.healthy and b.http_address]

        async def one(backend: Backend) -> Any:
            answer = await self.client.request(
                method, f"http://{backend.http_address}{path}", content=body
            )
            answer.raise_for_status()
            return answer.json()

        results = await asyncio.gather(*(one(b) for b in backends), return_exceptions=True)
        return [r for r in results if not isinstance(r, BaseException)]

    async def all_statistics(self, request: Request) -> Response:
        body = _merged(await self._each("GET", "/v2/models/stats", b""))
        return Response(orjson.dumps(body), media_type=JSON)

    async def index(self, request: Request) -> Response:
        body = await request.body()
        seen: dict[tuple[str, str, str], Any] = {}
        for answer in await self._each("POST", "/v2/repository/index", body):
            for entry in answer:
                key = (entry.get("name", ""), entry.get("version", ""), entry.get("state", ""))
                seen.setdefault(key, entry)
        return Response(orjson.dumps([seen[key] for key in sorted(seen)]), media_type=JSON)

    async def model_control(self, request: Request) -> Response:
        name = request.path_params["name"]
        action = request.url.path.rsplit("/", 1)[-1]
        having = await self.servicer.backends_having(name)
        if any(b.http_address is None for b in having):
            raise Unavailable(
                f"a backend with model '{name}' has no known REST address: {action} it over "
                "gRPC, or give the backend an http_address"
            )
        body = await self._body(request)
        headers = _forwarded(request.headers.items())
        path = f"/v2/repository/models/{name}/{action}"
        answers = await asyncio.gather(
            *(self._send(b, "POST", path, body, headers, request) for b in having),
            return_exceptions=True,
        )
        await self.servicer.refresh(having)
        for backend, answer in zip(having, answers, strict=True):
            if isinstance(answer, httpx.HTTPError):
                raise Unavailable(f"backend {backend.address}: {answer}")
            if isinstance(answer, BaseException):
                raise answer
            if answer.status_code >= 400:
                return answer
        return Response(status_code=200, media_type=JSON)

    async def close(self) -> None:
        await self.client.aclose()


def _merged(answers: list[Any]) -> dict[str, Any]:
    """Statistics answers, summed per (model, version)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for answer in answers:
        for stats in answer.get("model_stats", []):
            key = (stats.get("name", ""), stats.get("version", ""))
            if key in merged:
                add_json_statistics(merged[key], stats)
            else:
                merged[key] = stats
    return {"model_stats": [merged[key] for key in sorted(merged)]}


def _forwarded(headers: Any) -> list[tuple[str, str]]:
    return [(key, value) for key, value in headers if key.lower() not in _HOP_BY_HOP]


def add_json_statistics(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum `more` into `total`, as control.add_statistics does for protobuf messages."""
    for key, value in more.items():
        if key in ("name", "version", "batch_size"):
            continue
        if isinstance(value, dict):
            add_json_statistics(total.setdefault(key, {}), value)
        elif isinstance(value, list) and key == "batch_stats":
            by_size = {entry.get("batch_size"): entry for entry in total.setdefault(key, [])}
            for entry in value:
                if entry.get("batch_size") in by_size:
                    add_json_statistics(by_size[entry.get("batch_size")], entry)
                else:
                    total[key].append(entry)
        elif isinstance(value, list):
            total.setdefault(key, []).extend(value)
        elif key == "last_inference":
            total[key] = max(total.get(key, 0), value)
        elif isinstance(value, int | float):
            total[key] = total.get(key, 0) + value
