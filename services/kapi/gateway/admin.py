"""The admin REST API on the gateway's HTTP port (FastAPI; OpenAPI at /docs).

- `GET /v2/health/live`, `GET /v2/health/ready`: as a node's;
- `GET /v1/backends`: each backend with its health, profile, load, latency and models;
- `GET /v1/routes`, `GET|PUT|DELETE /v1/routes/{model}`: a model's route (traffic split,
  shadow, hardware preference, policy), with what its shadow has recorded;
- `POST /v1/registrations`, `DELETE /v1/registrations/{address}`: backends that dial in;
- the KServe v2 REST API, forwarded to the backends (rest.py).

Writes need `Authorization: Bearer <token>` when the gateway has an admin token. Every
handler is async: it runs on the gateway's event loop, as the data plane does, so the state
they share is never touched from two threads.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kapi.core.errors import KapiError, NotFound, PermissionDenied, Unauthenticated
from kapi.gateway.control import GatewayServicer
from kapi.gateway.discovery import BackendSpec
from kapi.gateway.discovery.registration import MAX_LEASE_S, RegistrationDiscovery
from kapi.gateway.rest import RestForwarder
from kapi.gateway.router import Router
from kapi.gateway.routes import BackendEntry, Route
from kapi.gateway.shadow import Shadowing

# The Authorization header, which admin writes check (module level: FastAPI resolves
# annotations in the module's namespace).
Authorization = Annotated[str | None, Header()]


class Registration(BackendEntry):
    model_config = ConfigDict(extra="forbid")

    lease_s: Annotated[float, Field(gt=0, le=MAX_LEASE_S)] = 15.0


class Token:
    def __init__(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    def check(self, authorization: str | None) -> None:
        if self._digest is None:
            return
        if not authorization:
            raise Unauthenticated(
                "this gateway's admin writes need 'Authorization: Bearer <token>'"
            )
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated("the Authorization header is not 'Bearer <token>'")
        presented = hashlib.sha256(value.strip().encode()).digest()
        if not hmac.compare_digest(presented, self._digest):
            raise PermissionDenied("the bearer token is not this gateway's admin token")


class RouteOut(BaseModel):
    model: str
    route: Route
    shadow_stats: dict[str, Any] | None = None


def admin_app(
    servicer: GatewayServicer,
    router: Router,
    shadowing: Shadowing,
    registrations: RegistrationDiscovery,
    token: str | None,
    rest: RestForwarder,
) -> FastAPI:
    app = FastAPI(
        title="kapi gateway",
        version="1",
        description="Backends, routes (traffic splits, shadows, hardware), registrations.",
    )
    admin = Token(token)

    @app.exception_handler(KapiError)
    async def _kapi_error(_: Request, exc: KapiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(
            {"error": problems, "detail": jsonable_encoder(exc.errors())}, status_code=422
        )

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if servicer.ready else 503)

    @app.get("/v1/backends")
    async def backends() -> list[dict[str, Any]]:
        return [backend.describe() for backend in router.pool]

    def route_out(model: str) -> RouteOut:
        entry = router.routes.get(model)
        if entry is None:
            raise NotFound(f"model '{model}' has no route (it is routed by the defaults)")
        stats = shadowing.stats.get(model)
        return RouteOut(
            model=model, route=entry.route, shadow_stats=stats.describe() if stats else None
        )

    @app.get("/v1/routes")
    async def routes() -> list[RouteOut]:
        return [route_out(model) for model in sorted(router.routes)]

    @app.get("/v1/routes/{model}")
    async def get_route(model: str) -> RouteOut:
        return route_out(model)

    @app.put("/v1/routes/{model}")
    async def put_route(model: str, route: Route, authorization: Authorization = None) -> RouteOut:
        admin.check(authorization)
        router.set_route(model, route)
        return route_out(model)

    @app.delete("/v1/routes/{model}", status_code=204)
    async def delete_route(model: str, authorization: Authorization = None) -> Response:
        admin.check(authorization)
        if not router.delete_route(model):
            raise NotFound(f"model '{model}' has no route")
        return Response(status_code=204)

    @app.post("/v1/registrations")
    async def register(body: Registration, authorization: Authorization = None) -> dict[str, Any]:
        admin.check(authorization)
        spec = BackendSpec(body.address, body.profile, body.http_address, body.weight)
        registrations.register(spec, body.lease_s)
        return {"address": body.address, "lease_s": body.lease_s}

    @app.delete("/v1/registrations/{address}", status_code=204)
    async def leave(address: str, authorization: Authorization = None) -> Response:
        admin.check(authorization)
        if not registrations.leave(address):
            raise NotFound(f"no backend registered as {address}")
        return Response(status_code=204)

    app.router.routes.extend(rest.routes())  # KServe v2 REST, forwarded (not in OpenAPI)
    return app
