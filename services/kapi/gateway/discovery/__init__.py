"""Where the gateway learns which backends exist: one small interface, one module per source.

A source runs until it is cancelled. Whenever what it knows changes, it publishes its whole
current set of backends (a snapshot, never a delta); the gateway keeps one set per source and
serves their union. A backend's address is its OIP gRPC endpoint, `host:port`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend as a source knows it, before the gateway has spoken to it."""

    address: str  # host:port of its OIP gRPC service
    # Its hardware profile (core/hardware.py) when the source knows it (config, an
    # EndpointSlice label, a registration); a kapi node reports its own, which wins.
    profile: str | None = None
    # host:port of its KServe v2 REST service, when known (for REST forwarding).
    http_address: str | None = None
    weight: float = 1.0  # for the weighted policy
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


Publish = Callable[[Collection[BackendSpec]], None]


class Discovery(Protocol):
    """A source of backends. `name` tells its set apart from other sources' sets."""

    name: str

    async def run(self, publish: Publish) -> None:
        """Publish the current set now and after every change, until cancelled."""
        ...
