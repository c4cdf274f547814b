"""The node's HTTP API on port 8000: the KServe v2 REST protocol with Triton's extensions
(model repository, statistics, binary tensor data), over the same data plane as gRPC.

As Triton answers: health and readiness are 200 or 400 with no body; every error is JSON
`{"error": "..."}` with Triton's status for it (400 bad request, 404 unknown, 501
unsupported, 503 unavailable); an unknown path is 404 and a wrong method 405. Where Triton
answers 500 for a request the client got wrong (JSON it cannot parse), kapi answers 400.

Inference is a plain ASGI endpoint: the body is read into one buffer, binary tensors are
viewed in place, and the response is sent in parts (JSON header, then each binary output)
without joining them, unless it is compressed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kapi.core.errors import (
    InvalidArgument,
    KapiError,
    ResourceExhausted,
    Unimplemented,
    as_kapi_error,
)
from kapi.core.inference import Parameter
from kapi.core.rest import (
    HEADER_LENGTH,
    HttpResponse,
    error_body,
    message_to_json,
    parse_header_length,
    request_from_http,
    response_to_http,
)
from kapi.node import responses
from kapi.node.dataplane import DataPlane

# Bodies past this size are compressed or decompressed off the event loop.
OFF_LOOP_BYTES = 256 * 1024
_CODINGS = ("identity", "gzip", "deflate")
JSON = "application/json"


class UnsupportedEncoding(Unimplemented):
    """A request body in a Content-Encoding kapi cannot decode (Triton's status, 501)."""


def rest_app(dataplane: DataPlane, max_body_bytes: int) -> Starlette:
    """The REST API; request bodies (once decompressed) are limited to `max_body_bytes`."""

    def status(ok: bool) -> Response:
        return Response(status_code=200 if ok else 400)

    async def live(request: Request) -> Response:
        return status(True)  # answering at all is being live

    async def ready(request: Request) -> Response:
        return status(dataplane.ready)

    async def server_metadata(request: Request) -> Response:
        name, version, extensions = dataplane.server_metadata()
        return _json({"name": name, "version": version, "extensions": list(extensions)})

    async def model_ready(request: Request) -> Response:
        name, version = _model(request)
        if dataplane.model_ready(name, version):
            return Response(status_code=200)
        return _error(400, "Model version not ready")  # Triton's words

    async def model_metadata(request: Request) -> Response:
        return _message(responses.model_metadata(dataplane, *_model(request)))

    async def model_config(request: Request) -> Response:
        config = responses.model_config(dataplane, *_model(request)).config
        return _message(config)

    async def model_statistics(request: Request) -> Response:
        name, version = _model(request) if "name" in request.path_params else ("", "")
        return _message(responses.statistics(dataplane, name, version))

    async def repository_index(request: Request) -> Response:
        _check_repository(request)
        body = await _json_body(request, max_body_bytes)
        ready_only = body.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidArgument("Unable to parse 'ready': it must be a bool")
        rows = []
        for row in dataplane.index(ready_only):
            entry = {"name": row.name, "version": row.version, "state": row.state}
            if not row.version:
                del entry["version"]
            if row.reason:
                entry["reason"] = row.reason
            rows.append(entry)
        return _json(rows)

    async def load(request: Request) -> Response:
        _check_repository(request)
        parameters = _load_parameters(await _json_body(request, max_body_bytes))
        await dataplane.load(request.path_params["name"], parameters)
        return Response(status_code=200, media_type=JSON)

    async def unload(request: Request) -> Response:
        _check_repository(request)
        body = await _json_body(request, max_body_bytes)
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidArgument("Unable to parse 'parameters': it must be an object")
        await dataplane.unload(request.path_params["name"], parameters)
        return Response(status_code=200, media_type=JSON)

    async def shm_status(request: Request) -> Response:
        regions = dataplane.shared_memory.status(request.path_params.get("region", ""))
        return _json(
            [
                {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for r in regions
            ]
        )

    async def shm_register(request: Request) -> Response:
        body = await _json_body(request, max_body_bytes)
        name = request.path_params["region"]
        for field in ("key", "byte_size"):  # Triton's words
            if field not in body:
                raise InvalidArgument(f"Shared memory register request has no '{field}' field")
        key, offset, byte_size = body["key"], body.get("offset", 0), body["byte_size"]
        if not isinstance(key, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (offset, byte_size)
        ):
            raise InvalidArgument(
                "Shared memory register request: 'key' is a string, 'offset' and "
                "'byte_size' are integers"
            )
        dataplane.shared_memory.register(name, key, offset, byte_size)
        return Response(status_code=200, media_type=JSON)

    async def shm_unregister(request: Request) -> Response:
        dataplane.shared_memory.unregister(request.path_params.get("region", ""))
        return Response(status_code=200, media_type=JSON)

    def unsupported(feature: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            raise Unimplemented(f"{feature} is not supported by this node")

        return endpoint

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    infer = InferEndpoint(dataplane, max_body_bytes)
    routes = [
        _route("/v2", server_metadata, methods=["GET"]),
        _route("/v2/health/live", live, methods=["GET"]),
        _route("/v2/health/ready", ready, methods=["GET"]),
        _route("/v2/models/stats", model_statistics, methods=["GET"]),
        _route("/v2/repository/index", repository_index, methods=["POST"]),
        _route("/v2/repository/{repository}/index", repository_index, methods=["POST"]),
        _route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        _route("/v2/repository/{repository}/models/{name}/load", load, methods=["POST"]),
        _route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
        _route("/v2/repository/{repository}/models/{name}/unload", unload, methods=["POST"]),
    ]
    for prefix in (model, versioned):
        routes += [
            _route(prefix, model_metadata, methods=["GET"]),
            _route(f"{prefix}/ready", model_ready, methods=["GET"]),
            _route(f"{prefix}/config", model_config, methods=["GET"]),
            _route(f"{prefix}/stats", model_statistics, methods=["GET"]),
            Route(f"{prefix}/infer", infer, methods=["POST"]),  # plain ASGI
        ]
    shm = "/v2/systemsharedmemory"
    routes += [
        _route(f"{shm}/status", shm_status, methods=["GET"]),
        _route(f"{shm}/region/{{region}}/status", shm_status, methods=["GET"]),
        _route(f"{shm}/region/{{region}}/register", shm_register, methods=["POST"]),
        _route(f"{shm}/unregister", shm_unregister, methods=["POST"]),
        _route(f"{shm}/region/{{region}}/unregister", shm_unregister, methods=["POST"]),
    ]
    for action in ("status", "register", "unregister"):
        for path in (
            f"/v2/cudasharedmemory/{action}",
            f"/v2/cudasharedmemory/region/{{r}}/{action}",
        ):
            routes.append(_route(path, unsupported("CUDA shared memory"), methods=["GET", "POST"]))
    for path, feature in (
        ("/v2/trace/setting", "tracing"),
        (f"{model}/trace/setting", "tracing"),
        ("/v2/logging", "log settings"),
        (f"{model}/generate", "the generate extension"),
        (f"{model}/generate_stream", "the generate extension"),
    ):
        routes.append(_route(path, unsupported(feature), methods=["GET", "POST"]))
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},
    )


def _route(
    path: str, endpoint: Callable[[Request], Awaitable[Response]], methods: list[str]
) -> Route:
    return Route(path, _answering_errors(endpoint), methods=methods)


def _answering_errors(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Every error an endpoint raises, as Triton's JSON error with its status."""

    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except HTTPException:
            raise
        except Exception as exc:
            error = as_kapi_error(exc)
            return _error(error.http_status, error.message)

    return wrapper


class InferEndpoint:
    """POST .../infer as a plain ASGI app, the REST data path."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int) -> None:
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        headers = {key.lower(): value for key, value in scope["headers"]}
        try:
            name, version = params["name"], _version(params.get("version", ""))
            encoding = _content_encoding(headers)
            limits = self.dataplane.request_limits(name, version)
            body = await self._body(receive, headers)
            if encoding != "identity":
                body = await _off_loop(len(body), _decompress, body, self.max_body_bytes)
            length = parse_header_length(_header(headers, HEADER_LENGTH), len(body))
            request, binary, binary_default = request_from_http(body, length, name, version, limits)
            response = await self.dataplane.infer(request)
            listed = {output.name for output in request.outputs}
            encoded = response_to_http(response, binary, binary_default, listed)
            await _send(send, encoded, _accepted_coding(headers))
        except Exception as exc:
            error = as_kapi_error(exc)
            extra = [(b"accept-encoding", b"gzip, deflate")] * isinstance(
                error, UnsupportedEncoding
            )
            await _send_error(send, error, extra)

    async def _body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        """The whole request body, read into one buffer when its length is given."""
        declared = headers.get(b"content-length")
        size = int(declared) if declared and declared.isdigit() else None
        if size is not None and size > self.max_body_bytes:
            raise _too_large(size, self.max_body_bytes)
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidArgument("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            received += len(chunk)
            if received > self.max_body_bytes:
                raise _too_large(received, self.max_body_bytes)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _model(request: Request) -> tuple[str, str]:
    params = request.path_params
    return params["name"], _version(params.get("version", ""))


def _version(version: str) -> str:
    """A version in the path is digits, as Triton routes it; anything else names no route."""
    if version and not (version.isascii() and version.isdigit()):
        raise HTTPException(404, "Not Found")
    return version


def _check_repository(request: Request) -> None:
    if "repository" in request.path_params:  # Triton's words
        raise Unimplemented("'repository_name' specification is not supported")


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """An optional JSON object body ({} when empty), read only up to `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"failed to parse the request JSON buffer: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return value


def _load_parameters(body: dict[str, Any]) -> dict[str, Parameter | bytes]:
    """Load parameters as gRPC carries them: `config` a string, `file:` contents bytes (sent
    base64 over REST)."""
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument("Unable to parse 'parameters': it must be an object")
    decoded: dict[str, Parameter | bytes] = {}
    for key, value in parameters.items():
        if not isinstance(value, str):
            raise InvalidArgument(
                f"Unable to parse '{key}': load parameter values are strings (file contents "
                "in base64)"
            )
        if key.startswith("file:"):
            try:
                decoded[key] = base64.b64decode(value, validate=True)
            except binascii.Error as exc:
                raise InvalidArgument(f"load parameter '{key}' is not valid base64: {exc}") from exc
        else:
            decoded[key] = value
    return decoded


def _header(headers: dict[bytes, bytes], name: str) -> str | None:
    value = headers.get(name.encode())
    return None if value is None else value.decode("latin-1")


def _content_encoding(headers: dict[bytes, bytes]) -> str:
    coding = (_header(headers, "content-encoding") or "identity").strip().lower() or "identity"
    if coding not in _CODINGS:  # Triton's words and status
        raise UnsupportedEncoding(
            f"Unsupported compression type '{coding}'; kapi takes gzip and deflate"
        )
    return coding


def _decompress(body: bytes, limit: int) -> bytes:
    """gzip or zlib data, whichever header it has, as Triton reads both encodings."""
    if not body:  # Triton's words
        raise InvalidArgument("nothing to be decompressed")
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"the request body could not be decompressed: {exc}") from exc
    if len(data) > limit:
        raise _too_large(len(data), limit, "decompressed")
    if not inflater.eof:
        raise InvalidArgument("the request body could not be decompressed: it is truncated")
    return data


def _accepted_coding(headers: dict[bytes, bytes]) -> str:
    """The coding with the highest weight in Accept-Encoding (the first of equals), from
    identity, gzip and deflate; identity when none is named."""
    best, weight = "identity", 0.0
    for item in (_header(headers, "accept-encoding") or "").split(","):
        coding, _, rest = item.strip().partition(";")
        coding = coding.strip().lower()
        if coding not in _CODINGS:
            continue
        q = 1.0
        rest = rest.strip()
        if rest.startswith("q="):
            try:
                q = float(rest[2:])
            except ValueError:
                continue
        if q > weight:
            best, weight = coding, q
    return best


def _compress(parts: list[bytes], coding: str) -> bytes:
    compressor = zlib.compressobj(wbits=31 if coding == "gzip" else zlib.MAX_WBITS)
    return b"".join([*(compressor.compress(part) for part in parts), compressor.flush()])


async def _off_loop(size: int, work: Callable[..., bytes], *args: Any) -> bytes:
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(work, *args)
    return work(*args)


async def _send(send: Send, response: HttpResponse, coding: str) -> None:
    headers = [(b"content-type", JSON.encode())]
    if response.header_length is not None:
        headers = [
            (b"content-type", b"application/octet-stream"),
            (HEADER_LENGTH.encode(), str(response.header_length).encode()),
        ]
    parts = response.parts
    if coding != "identity":
        parts = [await _off_loop(response.size, _compress, parts, coding)]
        headers.append((b"content-encoding", coding.encode()))
    headers.append((b"content-length", str(sum(len(part) for part in parts)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    last = len(parts) - 1
    for index, part in enumerate(parts):
        await send({"type": "http.response.body", "body": part, "more_body": index < last})


async def _send_error(send: Send, error: KapiError, extra: list[tuple[bytes, bytes]]) -> None:
    body = error_body(error.message)
    headers = [
        (b"content-type", JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(size: int, limit: int, what: str = "") -> ResourceExhausted:
    return ResourceExhausted(
        f"the request body{' ' + what if what else ''} is {size} bytes, over the node's limit "
        f"of {limit} bytes (KAPI_NODE_MAX_MESSAGE_BYTES)"
    )


def _json(value: object) -> Response:
    return Response(orjson.dumps(value), media_type=JSON)


def _message(message: Message) -> Response:
    return _json(message_to_json(message))


def _error(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, media_type=JSON)
