"""The node's HTTP endpoints on port 8000: KServe v2 server metadata, health and readiness.

As the KServe v2 protocol says and Triton answers: 200 for true, 400 for false; an error is
JSON `{"error": "..."}` with its status.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kapi.core.errors import KapiError
from kapi.node.dataplane import DataPlane


def health_app(dataplane: DataPlane) -> Starlette:
    def status(ok: bool) -> Response:
        return Response(status_code=200 if ok else 400)

    async def live(request: Request) -> Response:
        return status(True)  # answering at all is being live

    async def ready(request: Request) -> Response:
        return status(dataplane.ready)

    async def model_ready(request: Request) -> Response:
        params = request.path_params
        return status(dataplane.model_ready(params["name"], params.get("version", "")))

    async def metadata(request: Request) -> Response:
        name, version, extensions = dataplane.server_metadata()
        return JSONResponse({"name": name, "version": version, "extensions": list(extensions)})

    async def error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KapiError)
        return JSONResponse({"error": exc.message}, status_code=exc.http_status)

    return Starlette(
        routes=[
            Route("/v2", metadata),
            Route("/v2/health/live", live),
            Route("/v2/health/ready", ready),
            Route("/v2/models/{name}/ready", model_ready),
            Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        ],
        exception_handlers={KapiError: error},
    )
