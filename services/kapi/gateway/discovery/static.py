"""The static source: backends named on the command line or in the config file."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from kapi.gateway.discovery import BackendSpec, Publish


class StaticDiscovery:
    name = "static"

    def __init__(self, specs: Collection[BackendSpec]) -> None:
        self.specs = list(specs)

    def replace(self, specs: Collection[BackendSpec], publish: Publish) -> None:
        """A reloaded config's list (SIGHUP)."""
        self.specs = list(specs)
        publish(self.specs)

    async def run(self, publish: Publish) -> None:
        publish(self.specs)
        await asyncio.Event().wait()  # nothing changes on its own
