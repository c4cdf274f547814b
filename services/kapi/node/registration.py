"""Registration with a gateway this node dials (an edge device outside the cluster): the
node registers its gRPC address and profile with the gateway's admin API, renews the lease
at a third of its length (two lost renewals in a row still do not let it expire), and
leaves when it drains (kapi.gateway.discovery.registration is the gateway's side)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

log = logging.getLogger(__name__)


class Registrar:
    def __init__(
        self,
        gateway_url: str,
        address: str,
        profile: str | None,
        lease_s: float = 15.0,
        token: str | None = None,
    ) -> None:
        self.url = gateway_url.rstrip("/") + "/v1/registrations"
        self.address = address
        self.profile = profile
        self.lease_s = lease_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=5.0)

    async def register(self) -> None:
        body = {"address": self.address, "profile": self.profile, "lease_s": self.lease_s}
        response = await self._client.post(self.url, json=body)
        response.raise_for_status()

    async def run(self) -> None:
        while True:
            try:
                await self.register()
            except httpx.HTTPStatusError as exc:  # refused: say why, as the gateway said it
                log.warning(
                    "the gateway at %s refused the registration: %s %s",
                    self.url,
                    exc.response.status_code,
                    exc.response.text,
                )
            except httpx.HTTPError as exc:
                log.warning("cannot register with the gateway at %s: %s", self.url, exc)
            await asyncio.sleep(self.lease_s / 3)

    async def leave(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self._client.delete(f"{self.url}/{self.address}")
        await self._client.aclose()
