"""The backends the gateway routes to: their channels, what they serve, and their state.

A backend is any OIP server: a kapi node or an NVIDIA Triton server. What it serves, its
name and its hardware profile are learned through the protocol itself (RepositoryIndex,
ServerMetadata: a kapi node lists its profiles as `kapi-profile:<profile>` extensions);
a profile from the discovery source (config, an EndpointSlice label) stands in for servers
that do not report one.

Each backend has a few channels, used in turn: one HTTP/2 connection serializes its
frames, and at concurrency 16 several connections carry more.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from kapi.core.oip import HTTP_PORT_EXTENSION, PROFILE_EXTENSION
from kapi.gateway.discovery import BackendSpec

SERVICE_PATH = "/inference.GRPCInferenceService/"
# How much a new latency moves the average: about the last ten requests count.
EWMA_ALPHA = 0.1
# An average not fed for this long starts to fade (by e each further period).
EWMA_FADE_S = 1.0

_GPU = ("nvidia-sm",)
_EDGE = ("jetson-orin", "rpi5", "edgetpu", "intel-npu", "mcu-cortex-m0", "cpu-arm64")


def hardware_class(profile: str | None) -> str | None:
    """`gpu`, `edge` or `cpu` for a profile (None when the profile is unknown)."""
    if profile is None:
        return None
    if profile.startswith(_GPU):
        return "gpu"
    if profile in _EDGE:
        return "edge"
    if profile.startswith("cpu-"):
        return "cpu"
    return None


class Backend:
    """One backend: channels, health, what it serves, and the load it carries now."""

    def __init__(self, spec: BackendSpec, channels: int, max_message_bytes: int) -> None:
        self.spec = spec
        self.address = spec.address
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Channels with equal arguments share one connection; a local pool keeps each
            # channel its own connection.
            ("grpc.use_local_subchannel_pool", 1),
            # A backend that comes back is found within about two seconds.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._channels = [
            grpc.aio.insecure_channel(spec.address, options=options) for _ in range(channels)
        ]
        self._calls: dict[str, Iterator[Any]] = {}
        # State, written by the forwarder and the prober (one event loop: no locks).
        self.outstanding = 0
        self._latency_ewma_s = 0.0
        self._observed_at = 0.0
        self.healthy = False  # until the first probe answers
        self.server_name = ""  # "triton", "kapi", … from ServerMetadata
        self.server_version = ""
        self.reported_profiles: tuple[str, ...] = ()
        self.reported_http_port: str | None = None
        self.extensions: tuple[str, ...] = ()
        self.models: dict[str, frozenset[str]] = {}  # ready models: name -> versions
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.ejection_streak = 0
        self.requests = 0
        self.failures = 0
        self.stale = True  # what it serves must be learned again
        self.model_latency_s: dict[str, float] = {}  # an EWMA per model, for outliers
        self.model_samples: dict[str, int] = {}  # how many requests that EWMA has seen

    @property
    def latency_ewma_s(self) -> float:
        """Its latency average, fading as it goes unused: a backend that was slow once
        and then got no traffic would otherwise never be tried again."""
        if self._latency_ewma_s == 0.0:
            return 0.0
        idle = time.monotonic() - self._observed_at
        return (
            self._latency_ewma_s
            if idle < EWMA_FADE_S
            else self._latency_ewma_s * math.exp((EWMA_FADE_S - idle) / EWMA_FADE_S)
        )

    @property
    def weight(self) -> float:
        return self.spec.weight

    @property
    def profile(self) -> str | None:
        """Its best profile: its own report first, else the discovery source's."""
        return self.reported_profiles[0] if self.reported_profiles else self.spec.profile

    @property
    def profiles(self) -> tuple[str, ...]:
        if self.reported_profiles:
            return self.reported_profiles
        return (self.spec.profile,) if self.spec.profile else ()

    @property
    def http_address(self) -> str | None:
        """host:port of its REST API: the discovery source's, else the port it reports on
        the host of its gRPC address."""
        if self.spec.http_address is not None:
            return self.spec.http_address
        if self.reported_http_port is None:
            return None
        return f"{self.address.rpartition(':')[0]}:{self.reported_http_port}"

    def learn(self, name: str, version: str, extensions: tuple[str, ...]) -> None:
        """What its ServerMetadata says: its name and version, and in its extensions the
        profiles and REST port a kapi node reports."""
        self.server_name, self.server_version, self.extensions = name, version, extensions
        self.reported_profiles = tuple(
            e.removeprefix(PROFILE_EXTENSION) for e in extensions if e.startswith(PROFILE_EXTENSION)
        )
        ports = [
            e.removeprefix(HTTP_PORT_EXTENSION)
            for e in extensions
            if e.startswith(HTTP_PORT_EXTENSION)
        ]
        self.reported_http_port = ports[0] if ports else None

    @property
    def hardware(self) -> str | None:
        return hardware_class(self.profile)

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def serves(self, model: str, version: str = "") -> bool:
        versions = self.models.get(model)
        return versions is not None and (not version or version in versions)

    def unary(self, method: str) -> Any:
        """The raw-bytes unary callable of `method` on its next channel."""
        calls = self._calls.get(method)
        if calls is None:
            calls = self._calls[method] = itertools.cycle(
                [channel.unary_unary(SERVICE_PATH + method) for channel in self._channels]
            )
        return next(calls)

    def stream(self, method: str) -> Any:
        key = "stream:" + method
        calls = self._calls.get(key)
        if calls is None:
            calls = self._calls[key] = itertools.cycle(
                [channel.stream_stream(SERVICE_PATH + method) for channel in self._channels]
            )
        return next(calls)

    def channel(self) -> grpc.aio.Channel:
        return self._channels[0]

    def observe(self, model: str, latency_s: float) -> None:
        """A request answered in `latency_s`: into the averages."""
        self._latency_ewma_s = _ewma(self.latency_ewma_s, latency_s)  # from the faded one
        self._observed_at = time.monotonic()
        self.model_latency_s[model] = _ewma(self.model_latency_s.get(model, 0.0), latency_s)
        self.model_samples[model] = self.model_samples.get(model, 0) + 1
        self.consecutive_failures = 0

    def eject(self, now: float, base_s: float, max_s: float) -> None:
        """Out of rotation for a while, twice as long each time in a row (it is probed back
        after); a streak ends once it has stayed in for `max_s`."""
        if now - self.ejected_until > max_s:
            self.ejection_streak = 0
        self.ejected_until = now + min(base_s * 2 ** min(self.ejection_streak, 32), max_s)
        self.ejection_streak += 1
        self.ejections += 1

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """What the admin API shows of it."""
        now = time.monotonic() if now is None else now
        return {
            "address": self.address,
            "server": self.server_name,
            "server_version": self.server_version,
            "healthy": self.healthy,
            "ejected": self.ejected(now),
            "ejections": self.ejections,
            "profile": self.profile,
            "hardware": self.hardware,
            "http_address": self.http_address,
            "weight": self.weight,
            "outstanding": self.outstanding,
            "latency_ewma_ms": round(self.latency_ewma_s * 1000, 3),
            "requests": self.requests,
            "failures": self.failures,
            "models": {name: sorted(versions) for name, versions in sorted(self.models.items())},
        }

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _ewma(average: float, value: float) -> float:
    return value if average == 0.0 else average + EWMA_ALPHA * (value - average)


class BackendPool:
    """The union of what every discovery source publishes, as live Backend objects."""

    def __init__(self, channels: int, max_message_bytes: int) -> None:
        self._channels = channels
        self._max_message_bytes = max_message_bytes
        self._by_source: dict[str, dict[str, BackendSpec]] = {}
        self.backends: dict[str, Backend] = {}
        self._closing: list[Backend] = []

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self.backends.values()))

    def publish(self, source: str, specs: Iterable[BackendSpec]) -> None:
        """Replace `source`'s set; backends no source names any more are closed."""
        self._by_source[source] = {spec.address: spec for spec in specs}
        wanted: dict[str, BackendSpec] = {}
        for specs_of_source in self._by_source.values():
            for address, spec in specs_of_source.items():
                wanted.setdefault(address, spec)
        for address in list(self.backends):
            backend = self.backends[address]
            if address not in wanted:
                self._closing.append(self.backends.pop(address))
            elif wanted[address] != backend.spec:
                backend.spec = wanted[address]  # a new profile or weight; channels stay
        for address, spec in wanted.items():
            if address not in self.backends:
                self.backends[address] = Backend(spec, self._channels, self._max_message_bytes)

    async def close_removed(self) -> None:
        """Close the channels of backends that left (once their requests are answered)."""
        keep = []
        for backend in self._closing:
            if backend.outstanding:
                keep.append(backend)
            else:
                await backend.close()
        self._closing = keep

    async def close(self) -> None:
        for backend in [*self.backends.values(), *self._closing]:
            await backend.close()
        self.backends.clear()
        self._closing.clear()
