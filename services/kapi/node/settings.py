"""The node's settings: environment `KAPI_NODE_*`, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import SettingsConfigDict

from kapi.core.settings import ServiceSettings


class NodeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KAPI_NODE_", extra="forbid")

    model_repository: Path = Path("/models")
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    # "none": load every model at start, refuse load/unload; "explicit": like Triton's
    # --model-control-mode=explicit, load `load_models` at start ("*": all).
    model_control_mode: Literal["none", "explicit"] = "none"
    load_models: list[str] = []
    # Triton's auto-complete gives a batchable model without a config this max_batch_size.
    default_max_batch_size: int = 4
    # Larger requests and responses are refused with RESOURCE_EXHAUSTED. 64 MiB holds a
    # batch of 64 FP32 images of 3x224x224 (37 MiB) and bounds what one request can cost.
    max_message_bytes: int = 64 * 1024 * 1024
    # How long SIGTERM or an unload waits for in-flight requests.
    drain_timeout_s: float = 30.0
    # Triton's --strict-readiness: ready only while every model asked for is loaded.
    strict_readiness: bool = True
    # Triton's --reuse-grpc-port: let several servers share the gRPC port (SO_REUSEPORT).
    reuse_grpc_port: bool = False
