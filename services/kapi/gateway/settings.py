"""The gateway's settings: environment `KAPI_GATEWAY_*`, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kapi.core.settings import ServiceSettings
from kapi.gateway.routes import parse_address

Port = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KAPI_GATEWAY_", extra="forbid")

    backend: list[str] = []  # HOST:PORT of each static backend's OIP gRPC service
    config: Path | None = None  # backends and routes (routes.py); reloaded on SIGHUP
    host: str = "0.0.0.0"
    grpc_port: Port = 8001
    http_port: Port = 8000
    metrics_port: Port = 8002
    # Connections per backend, used in turn (one HTTP/2 connection serializes its frames).
    channels_per_backend: Annotated[int, Field(ge=1, le=64)] = 2
    max_message_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    health_interval_s: Annotated[float, Field(gt=0)] = 1.0
    refresh_interval_s: Annotated[float, Field(gt=0)] = 10.0
    probe_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    health_check: Literal["server-ready", "grpc-health"] = "server-ready"
    # Retries may add this share of the requests (plus a floor of 10 a second).
    retry_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    ejection_failures: Annotated[int, Field(ge=1)] = 5
    admin_token: str | None = None  # bearer token for the admin API's writes
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    # Kubernetes EndpointSlices: watched when a label selector is given.
    kubernetes_selector: str | None = None
    kubernetes_namespace: str = "default"
    kubeconfig: Path | None = None

    @field_validator("backend")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            parse_address(address)
        return value
