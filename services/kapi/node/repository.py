"""The node's model repository: a Triton-layout directory and the versions loaded from it.

A (re)load brings every selected version up completely before it replaces what was serving;
the versions it replaces are unloaded after their in-flight requests drain. Whatever goes
wrong while a model loads (its directory, its config, its runtime, a bug) fails that model
alone: it is UNAVAILABLE with the reason, and every other model serves on.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, KapiError, NotFound, Unavailable, as_kapi_error
from kapi.node.config import (
    check_config,
    config_from_json,
    parse_version,
    read_config,
    select_versions,
)
from kapi.node.ensemble import composing_models, is_ensemble
from kapi.node.loader import load_ensemble, load_version
from kapi.node.model import ModelVersion
from kapi.node.parameters import LoadOverride
from kapi.node.stats import NodeMetrics

log = logging.getLogger(__name__)
UNLOADED = "unloaded"  # the reason of a model unloaded on request, as Triton words it


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
    files_dir: Path | None = None  # the directory of files a load override wrote


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
        try:
            entries = [p for p in self.root.iterdir() if p.is_dir()]
        except OSError as exc:
            raise Unavailable(f"the model repository {self.root} cannot be read: {exc}") from exc
        return sorted(p.name for p in entries if not p.name.startswith("."))

    async def load(
        self, name: str, override: LoadOverride | None = None, chain: tuple[str, ...] = ()
    ) -> None:
        """Load (or reload) a model; raises why it failed, having marked it UNAVAILABLE with
        that reason (a model that was serving keeps serving its old versions). An override
        loads its config in place of config.pbtxt, and with files, loads from those alone,
        written into a fresh directory that lives as long as what it loaded."""
        check_model_name(name)
        files_dir = None
        try:
            if override is not None and override.files:
                files_dir = _localize(name, override.files)
                model_dir: Path | None = files_dir
            else:
                model_dir = self._model_dir(name)
            if model_dir is None:
                raise NotFound(f"model '{name}' is not in the model repository {self.root}")
            config = config_from_json(name, override.config) if override else None
        except KapiError as exc:
            _remove(files_dir)
            log.error("model failed to load", extra={"model": name, "reason": exc.message})
            raise
        async with self._locks[name]:
            entry = self._models.setdefault(name, ModelEntry())
            serving = entry.state == State.READY
            entry.state = State.READY if serving else State.LOADING
            try:
                loaded = await self._load_versions(model_dir, config, (*chain, name))
            except BaseException as exc:
                _remove(files_dir)
                error = as_kapi_error(exc) if isinstance(exc, Exception) else None
                reason = error.message if error else "the load was cancelled"
                if not serving:
                    entry.state, entry.reason = State.UNAVAILABLE, reason
                log.error("model failed to load", extra={"model": name, "reason": reason})
                if error is None or error is exc:
                    raise
                raise error from exc
            old, entry.versions = entry.versions, loaded
            old_files, entry.files_dir = entry.files_dir, files_dir
            entry.state, entry.reason = State.READY, ""
            log.info("model ready", extra={"model": name, "versions": sorted(loaded)})
            await self._unload_versions(old.values())
            _remove(old_files)

    def note(self, name: str, reason: str) -> None:
        """Say why a model that serves is not what it should be (an update that failed,
        told by whoever asked for it), or clear that with ""; shown in the index."""
        entry = self._models.get(name)
        if entry is not None and entry.versions:
            entry.reason = reason

    def record_failure(self, name: str, reason: str) -> None:
        """A model the node was asked to load at start that is not there: UNAVAILABLE with
        the reason, so that it shows in the index and counts against strict readiness."""
        entry = self._models.setdefault(name, ModelEntry(State.UNAVAILABLE, reason))
        if not entry.versions and entry.state == State.UNAVAILABLE:
            entry.reason = reason

    def _model_dir(self, name: str) -> Path | None:
        """The model's directory, or None for a name that is not in the repository (a
        hidden name, one too long for the file system)."""
        if name.startswith("."):
            return None
        try:
            model_dir = self.root / name
            return model_dir if model_dir.is_dir() else None
        except (OSError, ValueError):
            return None

    async def _load_versions(
        self, model_dir: Path, config: mc.ModelConfig | None, chain: tuple[str, ...]
    ) -> dict[int, ModelVersion]:
        config = config or read_config(model_dir)
        check_config(config)
        versions = select_versions(model_dir, config)
        if is_ensemble(config):
            await self._load_composing(config, chain)
        loaded: dict[int, ModelVersion] = {}
        try:
            for version in versions:
                if is_ensemble(config):
                    loaded[version] = load_ensemble(
                        model_dir, version, config, self._metrics, self.get
                    )
                    continue
                loaded[version] = await load_version(
                    model_dir, version, config, self._metrics, self._default_max_batch_size
                )
        except BaseException:
            await self._unload_versions(loaded.values())
            raise
        return loaded

    async def _load_composing(self, config: mc.ModelConfig, chain: tuple[str, ...]) -> None:
        """As Triton loads by dependency: an ensemble's models that are not loaded load first."""
        for model in composing_models(config):
            if model in chain:
                raise InvalidArgument(
                    f"ensemble {config.name}: model '{model}' contains it, a cycle of "
                    f"{' -> '.join((*chain, model))}"
                )
            entry = self._models.get(model)
            if entry is None or entry.state != State.READY:
                try:
                    await self.load(model, chain=chain)
                except KapiError as exc:
                    raise InvalidArgument(
                        f"ensemble {config.name}: its model '{model}' failed to load: {exc.message}"
                    ) from exc

    def dependents(self, name: str) -> list[str]:
        """The models an ensemble runs that no other loaded ensemble runs."""
        entry = self._models.get(name)
        if entry is None or not entry.versions:
            return []
        config = max(entry.versions.items())[1].config
        if not is_ensemble(config):
            return []
        others = {
            model
            for other, each in self._models.items()
            if other != name and each.versions
            for model in composing_models(max(each.versions.items())[1].config)
            if is_ensemble(max(each.versions.items())[1].config)
        }
        return [model for model in composing_models(config) if model not in others]

    async def unload_with_dependents(self, name: str) -> None:
        """Unload an ensemble and, as Triton's unload_dependents does, the models it runs
        that no other loaded ensemble runs (in turn, theirs)."""
        dependents = self.dependents(name)
        await self.unload(name)
        for model in dependents:
            await self.unload_with_dependents(model)

    def is_ready(self, name: str) -> bool:
        entry = self._models.get(name)
        return entry is not None and entry.state == State.READY

    async def unload(self, name: str) -> None:
        """Unload a model. A model that failed to load is unloaded too: it then no longer
        counts against readiness. As in Triton, unloading a model that is not loaded (or not
        there at all) does nothing, and succeeds."""
        check_model_name(name)
        if name not in self._models:  # before taking a lock: none is made for unknown names
            return
        async with self._locks[name]:
            entry = self._models[name]
            if entry.reason == UNLOADED:
                return
            if entry.state == State.LOADING:
                raise Unavailable(f"model '{name}' is loading; unload it once it has loaded")
            entry.state = State.UNLOADING
            old, entry.versions = entry.versions, {}
            await self._unload_versions(old.values())
            _remove(entry.files_dir)
            entry.files_dir = None
            entry.state, entry.reason = State.UNAVAILABLE, UNLOADED

    async def close(self) -> None:
        for name in list(self._models):
            entry = self._models[name]
            if entry.versions:
                await self.unload(name)

    def all_ready(self) -> bool:
        """Triton's strict readiness: every model it was asked to load is READY, unless it
        was unloaded on request since."""
        return all(
            entry.state == State.READY or entry.reason == UNLOADED
            for entry in self._models.values()
        )

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve: the one named, or the highest loaded."""
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"Request for unknown model: '{name}' is not found")  # Triton's words
        number = parse_version(version) if version else None
        if version and number is None:  # as Triton words it
            raise InvalidArgument(
                f"failed to get model version from specified version string '{version}', "
                "version should be an integral value > 0"
            )
        if not entry.versions:
            raise Unavailable(  # Triton's words, then the model's state (it may come back)
                f"Request for unknown model: '{name}' has no available versions; it is "
                f"{entry.state} {entry.reason}".rstrip()
            )
        if number is None:
            return entry.versions[max(entry.versions)]
        loaded = entry.versions.get(number)
        if loaded is None:
            raise NotFound(  # Triton's words, then the versions there are
                f"Request for unknown model: '{name}' version {version} is not found; "
                f"loaded: {sorted(entry.versions)}"
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
            entry = self._models.get(name, ModelEntry())
            if entry.versions:
                rows.extend(
                    IndexEntry(name, str(v), entry.state, entry.reason)
                    for v in sorted(entry.versions)
                )
            elif not ready_only:
                rows.append(IndexEntry(name, "", entry.state, entry.reason))
        return rows

    async def _unload_versions(self, versions: Iterable[ModelVersion]) -> None:
        for version in list(versions):
            await version.unload(self._drain_timeout_s)


def check_model_name(name: str) -> None:
    """A model name that can name a directory, in Triton's words when it cannot."""
    if not name.strip():
        raise InvalidArgument("Model name cannot be empty. Please enter a valid name to deploy.")
    if name.strip() in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InvalidArgument(
            f"invalid model name '{name}', model name must not contain path traversal characters"
        )


def _localize(name: str, files: dict[str, bytes]) -> Path:
    """Write a load override's files into a fresh directory, each inside it (Triton's
    words for one that would land outside); the directory, or nothing, on failure."""
    root = Path(tempfile.mkdtemp(prefix="kapi-override-")).resolve()  # any name fits
    try:
        for relative, contents in files.items():
            target = root / relative.replace("\0", "\\0")
            target = target.resolve()
            if "\0" in relative or not target.is_relative_to(root) or target == root:
                raise InvalidArgument(
                    f"Invalid file parameter 'file:{relative}' with normalized path '{target}' "
                    "must stay within model directory."
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(contents)
    except OSError as exc:
        _remove(root)
        raise InvalidArgument(f"the files of model '{name}' could not be written: {exc}") from exc
    except BaseException:
        _remove(root)
        raise
    return root


def _remove(directory: Path | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
