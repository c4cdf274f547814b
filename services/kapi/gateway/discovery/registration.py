"""Registration: backends that dial in (edge devices outside the cluster) and keep a lease.

A backend registers with `POST /v1/registrations` on the gateway's HTTP port, giving its
gRPC address, its profile and a lease length, and registers again before the lease ends to
keep it; `DELETE /v1/registrations/{address}` leaves at once. A lease that is not renewed
expires, and the backend leaves the pool. `Registrar` is the client a node runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import httpx

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


class Registrar:
    """Keeps a backend registered with a gateway: registers, then renews at a third of the
    lease, so two lost renewals in a row still do not let it expire."""

    def __init__(
        self,
        gateway_url: str,
        spec: BackendSpec,
        lease_s: float = 15.0,
        token: str | None = None,
    ) -> None:
        self.url = gateway_url.rstrip("/") + "/v1/registrations"
        self.spec = spec
        self.lease_s = lease_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=5.0)

    def body(self) -> dict[str, object]:
        return {
            "address": self.spec.address,
            "profile": self.spec.profile,
            "http_address": self.spec.http_address,
            "weight": self.spec.weight,
            "lease_s": self.lease_s,
        }

    async def register(self) -> None:
        response = await self._client.post(self.url, json=self.body())
        response.raise_for_status()

    async def run(self) -> None:
        while True:
            try:
                await self.register()
            except httpx.HTTPError as exc:
                log.warning("cannot register with the gateway at %s: %s", self.url, exc)
            await asyncio.sleep(self.lease_s / 3)

    async def leave(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self._client.delete(f"{self.url}/{self.spec.address}")
        await self._client.aclose()
