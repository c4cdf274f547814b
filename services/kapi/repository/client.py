"""A client of the repository's REST API (httpx), for the CLI, nodes, trainer and optimizer.

Errors come back as kapi's errors, with the repository's message: a 404 is NotFound, a 409
Conflict, and a repository that cannot be reached Unavailable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from kapi.core import errors
from kapi.repository import entities as ent

CHUNK = 1024 * 1024
_ERRORS: dict[int, type[errors.KapiError]] = {
    400: errors.InvalidArgument,
    401: errors.Unauthenticated,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.Conflict,
    412: errors.FailedPrecondition,
    413: errors.ResourceExhausted,
    416: errors.InvalidArgument,
    422: errors.InvalidArgument,
    503: errors.Unavailable,
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def variant_path(model: str, number: int, key: tuple[str, str, str]) -> str:
    return f"/v1/models/{model}/versions/{number}/variants/{'/'.join(key)}"


class RepositoryClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_env(cls, url: str | None = None, token: str | None = None) -> RepositoryClient:
        """URL and token from the arguments, else KAPI_REPOSITORY_URL and KAPI_TOKEN (or
        the file KAPI_TOKEN_FILE names)."""
        url = url or os.environ.get("KAPI_REPOSITORY_URL", "http://127.0.0.1:8080")
        token = token or os.environ.get("KAPI_TOKEN")
        if token is None and (token_file := os.environ.get("KAPI_TOKEN_FILE")):
            token = Path(token_file).read_text().strip()
        return cls(url, token)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RepositoryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.Unavailable(
                f"the repository at {self.url} cannot be reached: {exc}"
            ) from exc
        check(response)
        return response

    # models and versions

    def models(self) -> list[ent.ModelOut]:
        return [ent.ModelOut.model_validate(m) for m in self._call("GET", "/v1/models").json()]

    def model(self, name: str) -> ent.ModelOut:
        return ent.ModelOut.model_validate(self._call("GET", f"/v1/models/{name}").json())

    def create_model(self, spec: ent.ModelCreate) -> ent.ModelOut:
        body = spec.model_dump(mode="json", exclude_none=True)
        return ent.ModelOut.model_validate(self._call("POST", "/v1/models", json=body).json())

    def versions(self, name: str) -> list[ent.VersionOut]:
        rows = self._call("GET", f"/v1/models/{name}/versions").json()
        return [ent.VersionOut.model_validate(v) for v in rows]

    def version(self, name: str, number: int) -> ent.VersionOut:
        body = self._call("GET", f"/v1/models/{name}/versions/{number}").json()
        return ent.VersionOut.model_validate(body)

    def create_version(self, name: str, spec: ent.VersionCreate) -> ent.VersionOut:
        body = self._call("POST", f"/v1/models/{name}/versions", json=spec.model_dump()).json()
        return ent.VersionOut.model_validate(body)

    def delete_version(self, name: str, number: int) -> None:
        self._call("DELETE", f"/v1/models/{name}/versions/{number}")

    # variants

    def upload(
        self,
        name: str,
        number: int,
        key: tuple[str, str, str],
        artifact: Path,
        fmt: str = "file",
        filename: str | None = None,
    ) -> ent.VariantOut:
        """Upload an artifact in one pass over the file: its bytes go to /uploads while a
        thread hashes them, then the variant names them with that digest, which the
        repository checks against the bytes it got."""
        try:  # the bytes are worth sending only to a variant that is not there yet
            self.variant(name, number, key)
        except errors.NotFound:
            pass
        else:
            raise errors.Conflict(
                f"model '{name}' version {number} has a variant {'/'.join(key)} already; "
                "variants are immutable"
            )
        size = artifact.stat().st_size
        with _Hasher() as hasher, artifact.open("rb") as file:
            sent = self._call(
                "POST",
                "/v1/uploads",
                content=hasher.passing(_read_chunks(file)),
                headers={"content-length": str(size)},
            ).json()
            digest = hasher.digest()
        params = {"digest": digest, "format": fmt, "upload": sent["upload"]}
        if filename:
            params["filename"] = filename
        response = self._call("PUT", variant_path(name, number, key), params=params)
        return ent.VariantOut.model_validate(response.json())

    def variant(self, name: str, number: int, key: tuple[str, str, str]) -> ent.VariantOut:
        body = self._call("GET", variant_path(name, number, key)).json()
        return ent.VariantOut.model_validate(body)

    def set_report(
        self, name: str, number: int, key: tuple[str, str, str], report: dict[str, Any]
    ) -> ent.VariantOut:
        path = variant_path(name, number, key) + "/report"
        return ent.VariantOut.model_validate(self._call("PUT", path, json=report).json())

    def set_benchmarks(
        self, name: str, number: int, key: tuple[str, str, str], results: dict[str, Any]
    ) -> ent.VariantOut:
        path = variant_path(name, number, key) + "/benchmarks"
        return ent.VariantOut.model_validate(self._call("PUT", path, json=results).json())

    def download(
        self, name: str, number: int, key: tuple[str, str, str], target: Path, digest: str
    ) -> Path:
        """Download an artifact to `target`, resuming a partial file `target.part` with a
        Range request, and checking the digest before the file takes its name."""
        part = target.with_name(target.name + ".part")
        path = variant_path(name, number, key) + "/artifact"
        hasher = hashlib.sha256()  # on this thread: on two cores a thread of its own gains nothing
        have = 0
        if part.exists():
            with part.open("rb") as file:
                while chunk := file.read(CHUNK):
                    hasher.update(chunk)
                    have += len(chunk)
        headers = {"range": f"bytes={have}-"} if have else {}
        try:
            with self.http.stream("GET", path, headers=headers) as response:
                if response.status_code != 416:  # 416: the part file is whole already
                    if response.status_code != 206:  # the whole file: start again
                        check(response)
                        hasher, have = hashlib.sha256(), 0
                    with part.open("ab" if have else "wb") as file:
                        for chunk in response.iter_raw():
                            hasher.update(chunk)
                            file.write(chunk)
        except httpx.TransportError as exc:
            raise errors.Unavailable(
                f"the repository at {self.url} cannot be reached: {exc}"
            ) from exc
        actual = f"sha256:{hasher.hexdigest()}"
        if actual != digest:
            part.unlink(missing_ok=True)
            raise errors.InvalidArgument(
                f"the downloaded artifact's digest is {actual}, not {digest}; it was dropped"
            )
        part.replace(target)
        return target

    def config(self, name: str, number: int, key: tuple[str, str, str]) -> str:
        return self._call("GET", variant_path(name, number, key) + "/config.pbtxt").text

    # aliases, resolution, events

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        force: bool = False,
        expected_version: int | None = None,
    ) -> ent.ModelOut:
        spec = ent.AliasSet(version=version, force=force, expected_version=expected_version)
        body = spec.model_dump(exclude_none=True)
        return ent.ModelOut.model_validate(
            self._call("PUT", f"/v1/models/{name}/aliases/{alias}", json=body).json()
        )

    def resolve(
        self, name: str, ref: str, profiles: list[str], runtimes: list[str]
    ) -> ent.Resolved:
        params = {"ref": ref, "profile": profiles, "runtime": runtimes}
        body = self._call("GET", f"/v1/models/{name}/resolve", params=params).json()
        return ent.Resolved.model_validate(body)

    def cursor(self) -> int:
        """The id of the newest event: a watch from it sees every change after now."""
        return int(self._call("GET", "/v1/events/cursor").json()["cursor"])

    def events(self, after: int = 0, model: str | None = None) -> list[ent.EventOut]:
        params: dict[str, Any] = {"after": after}
        if model:
            params["model"] = model
        rows = self._call("GET", "/v1/events", params=params).json()
        return [ent.EventOut.model_validate(e) for e in rows]


def check(response: httpx.Response) -> None:
    """Raise the kapi error a failed response stands for, with the repository's message."""
    if response.is_success:
        return
    response.read()
    try:
        message = str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        message = response.text or response.reason_phrase
    error = _ERRORS.get(response.status_code, errors.InternalError)
    raise error(f"{message} (HTTP {response.status_code})")


class _Hasher:
    """sha256 on a thread of its own, so that an upload's hashing overlaps reading and
    sending (hashlib lets go of the GIL). Chunks are hashed in order, in batches of about
    CHUNK, a few batches behind at most."""

    AHEAD = 8

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, "sha256")
        self._hash = hashlib.sha256()
        self._steps: deque[Future[None]] = deque()

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *_: object) -> None:
        self._pool.shutdown(wait=True)

    def passing(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks, unchanged, each hashed on the way."""
        batch: list[bytes] = []
        size = 0
        for chunk in chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= CHUNK:
                self._submit(batch)
                batch, size = [], 0
            yield chunk
        if batch:
            self._submit(batch)

    def digest(self) -> str:
        while self._steps:
            self._steps.popleft().result()
        return f"sha256:{self._hash.hexdigest()}"

    def _submit(self, batch: list[bytes]) -> None:
        self._steps.append(self._pool.submit(self._update, batch))
        while len(self._steps) > self.AHEAD:
            self._steps.popleft().result()

    def _update(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self._hash.update(chunk)


def _read_chunks(file: Any) -> Iterator[bytes]:
    while chunk := file.read(CHUNK):
        yield chunk


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
