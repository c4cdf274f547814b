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

from kapi.core.errors import KapiError, Unimplemented
from kapi.gateway.backends import Backend
from kapi.gateway.control import SERVER_NAME, GatewayServicer, kapi_version
from kapi.gateway.metrics import GatewayMetrics
from kapi.gateway.router import HARDWARE_PARAMETER, Router

JSON = "application/json"
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
        name = request.path_params["name"]
        asked = request.path_params.get("version", "")
        tail = request.url.path.rsplit("/", 1)[-1]
        infer = request.method == "POST"
        version = self.router.version(name, asked) if infer else (asked or None)
        parameters: dict[str, object] = {}
        if (preference := request.headers.get(HARDWARE_PARAMETER)) is not None:
            parameters[HARDWARE_PARAMETER] = preference
        body = await request.body()
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
        if tail in ("ready", "config", "stats", "infer"):
            path += "/" + tail
        headers = _forwarded(request.headers.items())
        tried = [b for b in self.router.pool if b.http_address is None]
        started = time.perf_counter()
        while True:
            backend = self.router.choose(name, version, parameters, tried)
            backend.outstanding += 1
            try:
                response = await self._send(backend, request.method, path, body, headers, request)
            except httpx.TransportError as exc:  # not reached: another backend may answer
                tried.append(backend)
                if self.servicer.forwarder.budget.withdraw():
                    self.servicer.prober.unreachable(backend, str(exc))
                    if self._others(name, version, parameters, tried):
                        self.metrics.retries.labels(name).inc()
                        continue
                raise KapiError(f"backend {backend.address} could not be reached: {exc}") from exc
            finally:
                backend.outstanding -= 1
            if infer:
                elapsed = time.perf_counter() - started
                code = "OK" if response.status_code < 400 else f"HTTP {response.status_code}"
                self.metrics.answered(name, version or "", backend.address, code, elapsed)
            return response

    def _others(
        self, name: str, version: str | None, parameters: dict[str, object], tried: list[Backend]
    ) -> bool:
        try:
            self.router.choose(name, version, parameters, tried)
        except KapiError:
            return False
        return True

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

    async def _each(self, method: str, path: str, body: bytes) -> list[Any]:
        """Every healthy REST backend's JSON answer (a backend that fails is left out)."""
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
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for answer in await self._each("GET", "/v2/models/stats", b""):
            for stats in answer.get("model_stats", []):
                key = (stats.get("name", ""), stats.get("version", ""))
                if key in merged:
                    add_json_statistics(merged[key], stats)
                else:
                    merged[key] = stats
        body = {"model_stats": [merged[key] for key in sorted(merged)]}
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
        having = [b for b in await self.servicer.backends_having(name) if b.http_address]
        body = await request.body()
        headers = _forwarded(request.headers.items())
        path = f"/v2/repository/models/{name}/{action}"
        answers = await asyncio.gather(
            *(self._send(b, "POST", path, body, headers, request) for b in having)
        )
        await self.servicer.refresh(having)
        for backend, answer in zip(having, answers, strict=True):
            if answer.status_code >= 400:
                return answer
            del backend
        return Response(status_code=200, media_type=JSON)

    async def close(self) -> None:
        await self.client.aclose()


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
