"""The node's HTTP endpoints on port 8000: KServe v2 health and readiness."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kapi.node.dataplane import DataPlane


def health_app(dataplane: DataPlane) -> Starlette:
    def status(ok: bool) -> Response:
        return Response(status_code=200 if ok else 503)

    async def live(request: Request) -> Response:
        return status(dataplane.live)

    async def ready(request: Request) -> Response:
        return status(dataplane.ready)

    async def model_ready(request: Request) -> Response:
        params = request.path_params
        return status(dataplane.model_ready(params["name"], params.get("version", "")))

    async def metadata(request: Request) -> Response:
        name, version, extensions = dataplane.server_metadata()
        return JSONResponse({"name": name, "version": version, "extensions": list(extensions)})

    return Starlette(
        routes=[
            Route("/v2", metadata),
            Route("/v2/health/live", live),
            Route("/v2/health/ready", ready),
            Route("/v2/models/{name}/ready", model_ready),
            Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        ]
    )
