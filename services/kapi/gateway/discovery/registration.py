"""Registration: backends that dial in (edge devices outside the cluster) and keep a lease.

A backend registers with `POST /v1/registrations` on the gateway's HTTP port, giving its
gRPC address, its profile and a lease length, and registers again before the lease ends to
keep it; `DELETE /v1/registrations/{address}` leaves at once. A lease that is not renewed
expires, and the backend leaves the pool. The client a node runs is kapi.node.registration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from kapi.gateway.discovery import BackendSpec, Publish

log = logging.getLogger(__name__)
MAX_LEASE_S = 3600.0


@dataclass
class Lease:
    spec: BackendSpec
    expires: float


class RegistrationDiscovery:
    name = "registration"

    def __init__(self, sweep_s: float = 0.5) -> None:
        self.leases: dict[str, Lease] = {}
        self.sweep_s = sweep_s
        self._publish: Publish | None = None

    def register(self, spec: BackendSpec, lease_s: float) -> float:
        """Add or renew; returns when the lease ends (monotonic seconds)."""
        expires = time.monotonic() + min(lease_s, MAX_LEASE_S)
        known = self.leases.get(spec.address)
        self.leases[spec.address] = Lease(spec, expires)
        if known is None or known.spec != spec:
            log.info("backend %s registered (profile %s)", spec.address, spec.profile)
            self._changed()
        return expires

    def leave(self, address: str) -> bool:
        if self.leases.pop(address, None) is None:
            return False
        log.info("backend %s left", address)
        self._changed()
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        gone = [address for address, lease in self.leases.items() if lease.expires <= now]
        for address in gone:
            del self.leases[address]
            log.warning("backend %s: its registration lease expired", address)
        if gone:
            self._changed()
        return gone

    def _changed(self) -> None:
        if self._publish is not None:
            self._publish([lease.spec for lease in self.leases.values()])

    async def run(self, publish: Publish) -> None:
        self._publish = publish
        self._changed()
        while True:
            await asyncio.sleep(self.sweep_s)
            self.expire()
