"""grpc.health.v1 for a server whose readiness is a question asked of it (node, gateway):
Check answers the readiness as it is at that moment; `announce` tells Watch streams."""

from __future__ import annotations

from collections.abc import Callable

from grpc_health.v1 import health, health_pb2


class ReadinessHealth(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self, service: str, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._service = service
        self._ready = ready

    def _status(self) -> int:
        if self._ready():
            return health_pb2.HealthCheckResponse.SERVING  # type: ignore[no-any-return]
        return health_pb2.HealthCheckResponse.NOT_SERVING  # type: ignore[no-any-return]

    async def Check(self, request: health_pb2.HealthCheckRequest, context: object) -> object:  # noqa: N802
        if request.service not in ("", self._service):
            return await super().Check(request, context)
        return health_pb2.HealthCheckResponse(status=self._status())

    async def announce(self) -> None:
        """Tell grpc.health.v1 watchers the readiness as it is now."""
        status = self._status()
        await self.set("", status)
        await self.set(self._service, status)
