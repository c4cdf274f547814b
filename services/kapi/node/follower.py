"""A node that follows the model repository: `kapi node --repository URL --serve MODEL@ALIAS`.

For each MODEL@ALIAS the node asks the repository for the best variant for its hardware
profiles and runtimes, downloads it (digest checked) into its cache, which is a Triton-layout
directory (`CACHE/models`), and loads it. Then it follows the repository's watch stream:

- when an event touches a followed model (an alias moved, a variant or report added), the
  node resolves again, and when the answer is another artifact it loads that version
  completely, switches traffic to it, and unloads the old one once its requests are done
  (the model repository's reload). Requests never see a gap.
- when the new version fails to load, the old one keeps serving; the reason shows in
  RepositoryIndex, in `kapi_node_model_updates_total{result="failed"}` and in the log.
- when the repository is down, the node serves from its cache and reconnects with backoff;
  it starts from the cache when the repository is unreachable at boot. The stream resumes
  from the last event id it saw, so nothing is missed, and every reconnect resolves anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import random
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from kapi.core.errors import InvalidArgument, KapiError, Unavailable
from kapi.node.repository import ModelRepository
from kapi.repository.client import RepositoryClient
from kapi.repository.export import fetch, write_model
from kapi.repository.layout import config_pbtxt, write_config

log = logging.getLogger(__name__)
# Events that can change what a followed model@alias resolves to.
RELEVANT = {
    "alias.moved",
    "alias.deleted",
    "variant.uploaded",
    "variant.report",
    "variant.benchmarks",
    "version.deleted",
}
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 10.0


@dataclass(frozen=True, slots=True)
class Target:
    model: str
    ref: str  # an alias, a version number, or latest

    @classmethod
    def parse(cls, text: str) -> Target:
        model, _, ref = text.strip().partition("@")
        if not model:
            raise InvalidArgument(f"--serve {text!r}: expected MODEL@ALIAS")
        return cls(model, ref or "latest")

    def __str__(self) -> str:
        return f"{self.model}@{self.ref}"


@dataclass(frozen=True, slots=True)
class Serving:
    version: int
    digest: str
    variant: str  # runtime/precision/profile
    config: str  # config.pbtxt as written for this version


def installed_runtimes() -> list[str]:
    """The runtimes this node can load, by the libraries installed."""
    modules = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
    return [name for name, module in modules.items() if importlib.util.find_spec(module)]


class Follower:
    def __init__(
        self,
        client: RepositoryClient,
        targets: list[Target],
        cache: Path,
        repository: ModelRepository,
        profiles: list[str],
        registry: CollectorRegistry,
    ) -> None:
        models = [t.model for t in targets]
        if len(set(models)) != len(models):
            raise InvalidArgument(f"--serve names a model twice: {[str(t) for t in targets]}")
        self.client = client
        self.targets = targets
        self.cache = cache
        self.repository = repository
        self.profiles = profiles
        self.runtimes = installed_runtimes()
        self.serving: dict[Target, Serving] = {}
        # What failed to load, by target: not tried again until the target resolves to
        # something else (an event replayed, or a reconnect, would retry it in a loop).
        self.failed: dict[Target, tuple[int, str]] = {}
        self.reasons: dict[Target, str] = {}  # the last failure of each, until a switch
        self.cursor: int | None = None  # None: not known yet (the repository was down)
        self._state = cache / "state.json"
        self._locks = {t: asyncio.Lock() for t in targets}
        self.updates = Counter(
            "kapi_node_model_updates",
            "Switches to what an alias resolves to, by result",
            ("model", "result"),
            registry=registry,
        )
        self.version = Gauge(
            "kapi_node_model_serving_version",
            "The version a followed model serves",
            ("model",),
            registry=registry,
        )

    @property
    def models_dir(self) -> Path:
        return self.cache / "models"

    async def start(self) -> None:
        """Serve every target: from the repository, or from the cache when it is down."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._read_state()
        try:
            self.cursor = await asyncio.to_thread(self.client.cursor)
        except Unavailable as exc:
            log.warning(
                "repository unreachable at start: serving from the cache",
                extra={"reason": exc.message},
            )
            await self._load_cached()
            return
        for target in self.targets:
            await self.sync(target)

    async def run(self) -> None:
        """Follow the watch stream until cancelled, reconnecting with backoff."""
        failures = 0
        while True:
            try:
                if self.cursor is None:  # the repository was down at start: catch up now
                    self.cursor = await asyncio.to_thread(self.client.cursor)
                    for target in self.targets:
                        await self.sync(target)
                async for event in self._events():
                    failures = 0
                    self.cursor = max(self.cursor or 0, event["id"])
                    if event["kind"] in RELEVANT:
                        for target in self.targets:
                            if target.model == event["model"]:
                                await self.sync(target)
            except Exception as exc:  # the stream, the repository, or a bug: follow on
                if not isinstance(exc, httpx.HTTPError | KapiError | ValueError):
                    log.exception("watch stream failed")
                failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**failures) * random.uniform(0.5, 1)
                log.warning(
                    "watch stream lost; reconnecting",
                    extra={"reason": str(exc) or type(exc).__name__, "retry_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)
            # Whatever was missed while away: the cursor covers events, and a new resolve
            # covers the rest (a repository restored from a backup, say).
            for target in self.targets:
                await self.sync(target)

    async def sync(self, target: Target) -> None:
        """Serve what the target resolves to now; a failure keeps what serves. Nothing that
        goes wrong here escapes it: each failure is logged, counted and shown in the index."""
        async with self._locks[target]:
            try:
                await self._sync(target)
            except Exception as exc:  # a bug, or the disk: said, and the node follows on
                log.exception("model update failed", extra={"target": str(target)})
                self._failed(target, f"{target}: {_words(exc)}")
                await self._load_cached_one(target)

    async def _sync(self, target: Target) -> None:
        try:
            resolved = await asyncio.to_thread(
                self.client.resolve, target.model, target.ref, self.profiles, self.runtimes
            )
        except Unavailable:
            await self._load_cached_one(target)
            return
        except KapiError as exc:
            reason = f"{target} cannot be resolved: {exc.message}"
            self._failed(target, reason)
            await self._load_cached_one(target, reason)
            return
        variant = resolved.variant
        number = resolved.version.number
        current = self.serving.get(target)
        wanted = (number, variant.digest)
        if self.failed.get(target) == wanted:
            return
        if current is not None and (current.version, current.digest) == wanted:
            await self._load_cached_one(target)
            return
        key = f"{variant.runtime}/{variant.precision}/{variant.profile}"
        log.info(
            "switching model", extra={"target": str(target), "version": number, "variant": key}
        )
        clock = [time.perf_counter()]  # each phase's end, for the log

        def lap() -> float:
            clock.append(time.perf_counter())
            return round(clock[-1] - clock[-2], 4)

        try:
            artifact = await asyncio.to_thread(fetch, self.client, resolved, self.cache / "blobs")
        except KapiError as exc:  # the repository went away, or the bytes came in wrong
            self._failed(target, f"version {number} ({key}) could not be downloaded: {exc.message}")
            await self._load_cached_one(target)
            return
        phases = {"download_s": lap()}
        model_dir = self.models_dir / target.model
        live = model_dir / str(number)
        # Another artifact of the version that serves: the one that serves is kept aside
        # until the new one has loaded, and comes back if it does not.
        kept = model_dir / f".{number}-serving"
        if current is not None and current.version == number and live.is_dir():
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(live, kept)
        try:
            await asyncio.to_thread(
                write_model, resolved, artifact, self.models_dir, pin_version=True
            )
            phases["write_s"] = lap()
            await self.repository.load(target.model)
            phases["load_s"] = lap()
        except Exception as exc:  # the artifact itself failed: to write, or to load
            artifact.unlink(missing_ok=True)
            shutil.rmtree(live, ignore_errors=True)
            if kept.is_dir():
                os.replace(kept, live)
            if current is not None:
                write_config(model_dir, current.config)
            self.failed[target] = wanted
            self._failed(target, f"version {number} ({key}) failed to load: {_words(exc)}")
            await self._load_cached_one(target)
            return
        shutil.rmtree(kept, ignore_errors=True)
        config = config_pbtxt(resolved.model, variant, number)
        self.serving[target] = Serving(number, variant.digest, key, config)
        self.failed.pop(target, None)
        self.reasons.pop(target, None)
        self._write_state()
        self.updates.labels(target.model, "switched").inc()
        self.version.labels(target.model).set(number)
        self.repository.note(target.model, "")
        log.info("model switched", extra={"target": str(target), "version": number, **phases})
        if current is not None and current.version != number:
            shutil.rmtree(model_dir / str(current.version), ignore_errors=True)

    def _failed(self, target: Target, reason: str) -> None:
        """Say why, in the log, the metrics and the index: beside what serves, or as the
        reason nothing does."""
        log.error("model update failed", extra={"target": str(target), "reason": reason})
        self.updates.labels(target.model, "failed").inc()
        self.reasons[target] = reason
        if self.repository.is_ready(target.model):
            self.repository.note(target.model, reason)
        else:
            self.repository.record_failure(target.model, reason)

    async def _load_cached(self) -> None:
        for target in self.targets:
            await self._load_cached_one(target)

    async def _load_cached_one(self, target: Target, reason: str | None = None) -> None:
        """Serve the cached version of a target when nothing serves it yet: the version the
        state file names, with the config it served with."""
        if self.repository.is_ready(target.model):
            return
        serving = self.serving.get(target)
        if serving is None:
            unreachable = f"{target}: the repository is unreachable and nothing is cached"
            self.repository.record_failure(
                target.model, reason or self.reasons.get(target) or unreachable
            )
            return
        write_config(self.models_dir / target.model, serving.config)
        with contextlib.suppress(KapiError):  # logged by the load; the index shows it
            await self.repository.load(target.model)
            self.version.labels(target.model).set(serving.version)

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        """The watch stream's events after the cursor, as dicts."""
        headers = dict(self.client.http.headers)
        headers["last-event-id"] = str(self.cursor)
        timeout = httpx.Timeout(10.0, read=30.0)  # the server pings every 10 s
        async with (
            httpx.AsyncClient(base_url=self.client.url, headers=headers, timeout=timeout) as http,
            http.stream("GET", "/v1/events/stream") as response,
        ):
            if response.status_code != 200:
                await response.aread()
                raise Unavailable(f"watch stream: HTTP {response.status_code} {response.text}")
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

    def _read_state(self) -> None:
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return
        for target in self.targets:
            entry = state.get(str(target))
            if entry and (self.models_dir / target.model / str(entry["version"])).is_dir():
                self.serving[target] = Serving(**entry)

    def _write_state(self) -> None:
        state = {
            str(target): {
                "version": s.version,
                "digest": s.digest,
                "variant": s.variant,
                "config": s.config,
            }
            for target, s in self.serving.items()
        }
        temp = self._state.with_suffix(".tmp")
        temp.write_text(json.dumps(state, indent=2))
        temp.replace(self._state)


def _words(error: BaseException) -> str:
    return error.message if isinstance(error, KapiError) else f"{type(error).__name__}: {error}"
