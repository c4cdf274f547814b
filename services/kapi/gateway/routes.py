"""A model's route: its traffic split over versions, its shadow, its hardware preference and
its policy; and the gateway's config file, which holds backends and routes.

    backends:
      - {address: "10.0.0.5:8001", profile: nvidia-sm90}
      - {address: "edge-1:8001", profile: rpi5, weight: 0.5}
    routes:
      fashion:
        split: {"3": 90, "4": 10}          # percent (any positive weights)
        shadow: {version: "5", fraction: 0.1}
        hardware: [gpu, edge]              # preferred first, then any backend
        policy: least-outstanding          # round-robin, weighted, consistent-hash
        hash_parameter: session            # for consistent-hash: a request parameter
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kapi.core.errors import InvalidArgument
from kapi.core.hardware import is_known_profile
from kapi.gateway.discovery import BackendSpec
from kapi.gateway.policies import DEFAULT_POLICY, POLICIES

HARDWARE_CLASSES = ("gpu", "edge", "cpu")


_VERSION = re.compile(r"[1-9][0-9]*")


def check_version(version: str) -> str:
    """A version as backends spell it: ASCII digits, no leading zero."""
    if _VERSION.fullmatch(version) is None:
        raise ValueError(f"a model version is a positive integer, got {version!r}")
    return version


def check_hardware(item: str) -> str:
    if item not in HARDWARE_CLASSES and not is_known_profile(item):
        raise ValueError(
            f"unknown hardware {item!r}: a class ({', '.join(HARDWARE_CLASSES)}) or a profile "
            "(cpu-x86_64-avx2, nvidia-sm90, rpi5, …)"
        )
    return item


class Shadow(BaseModel):
    """Mirror `fraction` of the model's requests to a version, a backend, or both."""

    model_config = ConfigDict(extra="forbid")

    fraction: Annotated[float, Field(gt=0, le=1)]
    version: str | None = None
    backend: str | None = None  # host:port of one backend

    @field_validator("version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        return None if value is None else check_version(value)

    @model_validator(mode="after")
    def _target(self) -> Shadow:
        if self.version is None and self.backend is None:
            raise ValueError("a shadow needs a version, a backend, or both")
        return self


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = {}
    shadow: Shadow | None = None
    hardware: list[str] = []
    policy: str = DEFAULT_POLICY
    hash_parameter: str | None = None

    @field_validator("split")
    @classmethod
    def _split(cls, value: dict[str, float]) -> dict[str, float]:
        for version in value:
            check_version(version)
        return value

    @field_validator("hardware")
    @classmethod
    def _hardware(cls, value: list[str]) -> list[str]:
        return [check_hardware(item) for item in value]

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}: one of {', '.join(sorted(POLICIES))}")
        return value

    @model_validator(mode="after")
    def _hashing(self) -> Route:
        if self.policy == "consistent-hash" and not self.hash_parameter:
            raise ValueError("the consistent-hash policy needs hash_parameter")
        return self


class BackendEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str
    profile: str | None = None
    http_address: str | None = None
    weight: Annotated[float, Field(gt=0)] = 1.0

    @field_validator("address", "http_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        if value is not None and not is_known_profile(value):
            raise ValueError(f"unknown hardware profile {value!r}")
        return value

    def spec(self) -> BackendSpec:
        return BackendSpec(self.address, self.profile, self.http_address, self.weight)


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[BackendEntry] = []
    routes: dict[str, Route] = {}


def parse_address(address: str) -> tuple[str, int]:
    """host:port (IPv6 as [addr]:port), or ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a backend address is HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def load_config(path: Path) -> GatewayConfig:
    """The config file, or InvalidArgument saying where it is wrong."""
    try:
        document: Any = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise InvalidArgument(f"cannot read the gateway config {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the gateway config {path} is not YAML: {exc}") from exc
    try:
        return GatewayConfig.model_validate(document)
    except ValidationError as exc:
        raise InvalidArgument(f"the gateway config {path}: {describe(exc)}") from exc


def describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()
    )
