"""The node's settings: environment `KAPI_NODE_*`, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from kapi.core.settings import ServiceSettings

Port = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port


class NodeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KAPI_NODE_", extra="forbid")

    model_repository: Path = Path("/models")
    host: str = "0.0.0.0"
    grpc_port: Port = 8001
    http_port: Port = 8000
    metrics_port: Port = 8002
    # "none": load every model at start, refuse load/unload; "explicit": like Triton's
    # --model-control-mode=explicit, load `load_models` at start ("*": all).
    model_control_mode: Literal["none", "explicit"] = "none"
    load_models: list[str] = []
    # Triton's auto-complete gives a batchable model without a config this max_batch_size.
    default_max_batch_size: Annotated[int, Field(ge=0)] = 4
    # Larger requests and responses are refused with RESOURCE_EXHAUSTED. 64 MiB holds a
    # batch of 64 FP32 images of 3x224x224 (37 MiB) and bounds what one request can cost.
    max_message_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    # How long SIGTERM or an unload waits for in-flight requests.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    # Triton's --strict-readiness: ready only while every model asked for is loaded.
    strict_readiness: bool = True
    # Triton's --reuse-grpc-port: let several servers share the gRPC port (SO_REUSEPORT).
    reuse_grpc_port: bool = False
    # Follow the model repository at this URL instead of serving a directory: serve the best
    # variant of each MODEL@ALIAS in `serve` for this node's hardware, and switch when the
    # alias moves. Downloads live in `cache_dir`, which the node also serves from when the
    # repository is unreachable.
    repository: str | None = None
    serve: list[str] = []
    cache_dir: Path = Path("/var/cache/kapi/node")
    repository_token: str | None = None
    # Register with a gateway that this node dials (an edge device outside the cluster):
    # its admin URL, the gRPC address the gateway is to reach this node at (default: host
    # and gRPC port, when the host is not a wildcard), a token for its admin writes, and
    # the lease, renewed at a third of it.
    register_with: str | None = None
    advertise_address: str | None = None
    gateway_token: str | None = None
    registration_lease_s: Annotated[float, Field(gt=0, le=3600)] = 15.0

    @model_validator(mode="after")
    def _registration(self) -> NodeSettings:
        if self.register_with is None:
            for name in ("advertise_address", "gateway_token", "registration_lease_s"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name} needs register_with (--register-with URL)")
        elif self.advertise_address is not None:
            host, _, port = self.advertise_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"advertise_address is HOST:PORT, got {self.advertise_address!r}")
        elif self.host in ("0.0.0.0", "::", ""):
            raise ValueError(
                "register_with needs advertise_address (--advertise-address HOST:PORT): the "
                f"node listens on {self.host!r}, which is no address a gateway can dial"
            )
        return self

    @model_validator(mode="after")
    def _one_source(self) -> NodeSettings:
        """A directory or the repository, never both; and nothing that would go unused."""
        if self.repository is None:
            for name in ("serve", "repository_token"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name} needs repository (--repository URL)")
            return self
        if not self.serve:
            raise ValueError("repository needs serve (--serve MODEL@ALIAS[,MODEL@ALIAS...])")
        if "model_repository" in self.model_fields_set:
            raise ValueError("give model_repository or repository, not both")
        if self.model_control_mode != "none" or self.load_models:
            raise ValueError(
                "a node that follows the repository loads what --serve names: "
                "model_control_mode and load_models are for a model directory"
            )
        return self
