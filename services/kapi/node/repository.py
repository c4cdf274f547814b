"""The node's model repository: a Triton-layout directory and the versions loaded from it.

A (re)load brings every selected version up completely before it replaces what was serving;
the versions it replaces are unloaded after their in-flight requests drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kapi.core.errors import KapiError, NotFound, Unavailable
from kapi.node.config import read_config, select_versions
from kapi.node.model import ModelVersion
from kapi.node.stats import NodeMetrics

log = logging.getLogger(__name__)


class State(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class ModelEntry:
    state: State = State.UNAVAILABLE
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelRepository:
    def __init__(
        self, root: Path, metrics: NodeMetrics, default_max_batch_size: int, drain_timeout_s: float
    ) -> None:
        self.root = root
        self._metrics = metrics
        self._default_max_batch_size = default_max_batch_size
        self._drain_timeout_s = drain_timeout_s
        self._models: dict[str, ModelEntry] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def names_on_disk(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    async def load(self, name: str) -> None:
        model_dir = self.root / name
        if not name or "/" in name or name.startswith(".") or not model_dir.is_dir():
            raise NotFound(f"model '{name}' is not in the model repository {self.root}")
        async with self._locks[name]:
            entry = self._models.setdefault(name, ModelEntry())
            previous_state = entry.state
            entry.state = State.LOADING if previous_state != State.READY else previous_state
            try:
                loaded = await self._load_versions(model_dir)
            except KapiError as exc:
                if previous_state != State.READY:
                    entry.state, entry.reason = State.UNAVAILABLE, exc.message
                log.error("model load failed", extra={"model": name, "reason": exc.message})
                raise
            old, entry.versions = entry.versions, loaded
            entry.state, entry.reason = State.READY, ""
            log.info("model ready", extra={"model": name, "versions": sorted(loaded)})
            await self._unload_versions(old.values())

    async def _load_versions(self, model_dir: Path) -> dict[int, ModelVersion]:
        config = read_config(model_dir)
        versions = select_versions(model_dir, config)
        loaded: dict[int, ModelVersion] = {}
        try:
            for version in versions:
                loaded[version] = await ModelVersion.load(
                    model_dir, version, config, self._metrics, self._default_max_batch_size
                )
        except BaseException:
            await self._unload_versions(loaded.values())
            raise
        return loaded

    async def unload(self, name: str) -> None:
        async with self._locks[name]:
            entry = self._models.get(name)
            if entry is None or not entry.versions:
                raise NotFound(f"model '{name}' is not loaded")
            entry.state = State.UNLOADING
            old, entry.versions = entry.versions, {}
            await self._unload_versions(old.values())
            entry.state, entry.reason = State.UNAVAILABLE, "unloaded"

    async def close(self) -> None:
        for name in list(self._models):
            entry = self._models[name]
            if entry.versions:
                await self.unload(name)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve: the one named, or the highest loaded."""
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        if not entry.versions:
            raise Unavailable(f"model '{name}' is not ready: {entry.state} {entry.reason}".rstrip())
        if not version:
            return entry.versions[max(entry.versions)]
        loaded = entry.versions.get(int(version)) if version.isdigit() else None
        if loaded is None:
            raise NotFound(
                f"model '{name}' has no version '{version}', loaded: {sorted(entry.versions)}"
            )
        return loaded

    def ready_versions(self, name: str) -> list[int]:
        entry = self._models.get(name)
        return sorted(entry.versions) if entry else []

    def loaded(self) -> list[ModelVersion]:
        return [v for entry in self._models.values() for v in entry.versions.values()]

    def index(self, ready_only: bool) -> list[IndexEntry]:
        rows: list[IndexEntry] = []
        for name in sorted(set(self.names_on_disk()) | self._models.keys()):
            entry = self._models.get(name, ModelEntry(reason=""))
            if entry.versions:
                rows.extend(
                    IndexEntry(name, str(v), entry.state, "") for v in sorted(entry.versions)
                )
            elif not ready_only:
                rows.append(IndexEntry(name, "", entry.state, entry.reason))
        return rows

    async def _unload_versions(self, versions: Iterable[ModelVersion]) -> None:
        for version in list(versions):
            await version.unload(self._drain_timeout_s)
