"""The repository's REST API (FastAPI; OpenAPI docs at /docs), under /v1.

Errors are JSON `{"error": "..."}` with the status of kapi's error (400 bad input, 401 no or
bad token, 403 a token without the right, 404 unknown, 409 a conflict with the current
state, 412 a precondition such as verification, 416 a range past the end). Metadata calls
run in worker threads; uploads stream to the blob store in 1 MiB writes off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import tarfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from kapi.core.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    KapiError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from kapi.core.hardware import is_known_profile
from kapi.repository import entities as ent
from kapi.repository.auth import Authenticator, Principal
from kapi.repository.blobs import CHUNK, BlobStore, BlobWriter, hex_of
from kapi.repository.layout import ArchivePaths, config_pbtxt
from kapi.repository.store import MetadataStore

log = logging.getLogger(__name__)
PREFIX = "/v1"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
UPLOAD_AHEAD_CHUNKS = 8  # how far receiving may run ahead of hashing and writing, in CHUNKs
STREAM_IDLE_S = 1.0  # how often a quiet watch stream looks for events another process wrote


def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    authenticator: Authenticator = request.app.state.auth
    return authenticator.principal(authorization)


Who = Annotated[Principal, Depends(principal)]
ModelName = Annotated[str, Path(max_length=63)]
Number = Annotated[int, Path(ge=1)]


def variant_key(runtime: str, precision: str, profile: str) -> tuple[str, str, str]:
    if runtime not in ent.RUNTIMES:
        raise InvalidArgument(f"runtime {runtime!r} is not one of {list(ent.RUNTIMES)}")
    if precision not in ent.PRECISIONS:
        raise InvalidArgument(f"precision {precision!r} is not one of {list(ent.PRECISIONS)}")
    if not is_known_profile(profile):
        raise InvalidArgument(f"profile {profile!r} is not a known hardware profile")
    return runtime, precision, profile


Key = Annotated[tuple[str, str, str], Depends(variant_key)]


class DigestLocks:
    """One lock per digest, held from a blob's commit to its variant row, and by a delete
    from its check that no variant uses the blob to the delete. Within this process: replicas
    that share a blob store would need a lock they share (a database's advisory lock)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def hold(self, digest: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(digest, asyncio.Lock())
        self._holders[digest] += 1
        try:
            async with lock:
                yield
        finally:
            self._holders[digest] -= 1
            if not self._holders[digest]:
                del self._holders[digest], self._locks[digest]


class PendingUploads:
    """Bytes sent to /uploads, waiting for the variant upload that names them. They live in
    this process: behind a load balancer, the two requests must reach the same replica."""

    TTL_S = 3600.0
    LIMIT = 64  # in all
    LIMIT_PER_OWNER = 8  # per token, so that one cannot block the others

    def __init__(self) -> None:
        self._pending: dict[str, tuple[BlobWriter, str, float]] = {}

    def add(self, writer: BlobWriter, owner: str) -> str:
        if len(self._pending) >= self.LIMIT:
            raise Unavailable(f"{self.LIMIT} uploads wait to be named already; try again later")
        if sum(1 for _, who, _ in self._pending.values() if who == owner) >= self.LIMIT_PER_OWNER:
            raise Conflict(
                f"token '{owner}' has {self.LIMIT_PER_OWNER} uploads waiting to be named "
                "already; name them first"
            )
        upload = secrets.token_urlsafe(16)
        self._pending[upload] = (writer, owner, time.monotonic())
        return upload

    def take(self, upload: str, owner: str) -> BlobWriter:
        entry = self._pending.get(upload)
        if entry is None:
            raise NotFound(f"upload {upload!r} is unknown, taken already, or expired")
        if entry[1] != owner:
            raise PermissionDenied(f"upload {upload!r} was sent with another token")
        del self._pending[upload]
        return entry[0]

    def expired(self) -> list[BlobWriter]:
        cutoff = time.monotonic() - self.TTL_S
        stale = [key for key, (_, _, at) in self._pending.items() if at < cutoff]
        return [self._pending.pop(key)[0] for key in stale]

    def drain(self) -> list[BlobWriter]:
        writers = [writer for writer, _, _ in self._pending.values()]
        self._pending.clear()
        return writers


async def _expire(uploads: PendingUploads) -> None:
    """Drop uploads left unnamed past their time, every minute."""
    while True:
        await asyncio.sleep(60)
        for writer in uploads.expired():
            await run_in_threadpool(writer.abort)


class EventHub:
    """Wakes watch streams when a change commits (told from worker threads)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event


def create_app(store: MetadataStore, blobs: BlobStore, auth: Authenticator) -> FastAPI:
    hub = EventHub()
    store.on_commit.append(hub.notify_threadsafe)
    uploads = PendingUploads()
    digests = DigestLocks()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        hub.bind(asyncio.get_running_loop())
        expiry = asyncio.create_task(_expire(uploads))
        yield
        expiry.cancel()
        for writer in uploads.drain():
            writer.abort()

    app = FastAPI(
        title="kapi model repository",
        version="1",
        lifespan=lifespan,
        description="Versioned models, per-hardware variants, aliases, reports, change events.",
    )
    app.state.auth = auth

    @app.exception_handler(KapiError)
    async def _kapi_error(_: Request, exc: KapiError) -> JSONResponse:
        status = 412 if isinstance(exc, FailedPrecondition) else exc.http_status
        return JSONResponse({"error": exc.message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        # jsonable_encoder: a validator's error carries its exception in `ctx`.
        detail = jsonable_encoder(exc.errors())
        return JSONResponse({"error": problems, "detail": detail}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        # No such route (404) or method (405, with its Allow header): an error like the others.
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    VARIANT = PREFIX + "/models/{model}/versions/{number}/variants/{runtime}/{precision}/{profile}"

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get(PREFIX + "/models")
    def list_models(who: Who) -> list[ent.ModelOut]:
        auth.check_read(who)
        return store.list_models(who.may_see)

    @app.post(PREFIX + "/models", status_code=201)
    def create_model(who: Who, spec: ent.ModelCreate) -> ent.ModelOut:
        auth.check_write(who, spec.name)
        if spec.requirements is not None:
            _check_requirements(spec.name, spec.requirements)
        return store.create_model(who.name, spec)

    @app.get(PREFIX + "/models/{model}")
    def get_model(who: Who, model: ModelName) -> ent.ModelOut:
        auth.check_read(who, model)
        return store.get_model(model)

    @app.get(PREFIX + "/models/{model}/versions")
    def list_versions(who: Who, model: ModelName) -> list[ent.VersionOut]:
        auth.check_read(who, model)
        return store.list_versions(model)

    @app.post(PREFIX + "/models/{model}/versions", status_code=201)
    def create_version(who: Who, model: ModelName, spec: ent.VersionCreate) -> ent.VersionOut:
        auth.check_write(who, model)
        return store.create_version(who.name, model, spec)

    @app.get(PREFIX + "/models/{model}/versions/{number}")
    def get_version(who: Who, model: ModelName, number: Number) -> ent.VersionOut:
        auth.check_read(who, model)
        return store.get_version(model, number)

    @app.delete(PREFIX + "/models/{model}/versions/{number}", status_code=204)
    async def delete_version(who: Who, model: ModelName, number: Number) -> Response:
        auth.check_write(who, model)
        for digest in await run_in_threadpool(store.delete_version, who.name, model, number):
            async with digests.hold(digest):
                await drop_unused(digest)
        return Response(status_code=204)

    async def drop_unused(digest: str) -> None:
        """Delete a blob no variant uses; the caller holds the digest."""
        if not await run_in_threadpool(store.digest_used, digest):
            await run_in_threadpool(blobs.delete, digest)

    @app.put(VARIANT, status_code=201)
    async def upload_variant(
        request: Request,
        who: Who,
        model: ModelName,
        number: Number,
        key: Key,
        digest: Annotated[str, Query(description="sha256:<hex> of the artifact's bytes")],
        fmt: Annotated[Literal["file", "tar"], Query(alias="format")] = "file",
        filename: Annotated[str | None, Query()] = None,
        upload: Annotated[str | None, Query(description="bytes sent to /uploads")] = None,
    ) -> ent.VariantOut:
        """Upload an artifact. It is streamed to the blob store and becomes visible only once
        its digest (and its length, when Content-Length is sent) is checked; a variant is
        immutable. `format=tar`: a tar of the version directory's files. With `upload`, the
        bytes are those sent to /uploads before, and the request has no body; whatever the
        answer, the upload is used up."""
        auth.check_write(who, model)
        writer = uploads.take(upload, who.name) if upload is not None else None
        try:
            hex_of(digest)
            if fmt == "tar" and filename is not None:
                raise InvalidArgument(
                    "filename names a one-file artifact; a tar's files keep theirs"
                )
            name = ent.check_filename(filename or ent.DEFAULT_FILENAME[key[0]])
            has_body = request.headers.get("content-length", "0") != "0" or (
                "transfer-encoding" in request.headers
            )
            if writer is not None and has_body:
                raise InvalidArgument("a variant made from an upload has no body of its own")
            await run_in_threadpool(store.check_variant_free, model, number, key)
            if writer is None:
                writer = await run_in_threadpool(blobs.writer)
                await _receive(request, writer)
            # From its blob being in to its row being written, nothing may delete the blob:
            # a delete that finds no variant using these bytes waits for this one.
            async with digests.hold(digest):
                blob = await run_in_threadpool(writer.commit, digest)
                try:
                    if fmt == "tar":
                        await run_in_threadpool(_check_archive, blobs, blob.digest)
                    return await run_in_threadpool(
                        store.add_variant, who.name, model, number, key, blob.digest,
                        blob.size, fmt, name,
                    )  # fmt: skip
                except KapiError:
                    # Refused once its bytes were in (a bad archive; the variant taken or the
                    # version deleted meanwhile): drop them, unless a variant uses them.
                    await drop_unused(blob.digest)
                    raise
        finally:
            if writer is not None:
                await run_in_threadpool(writer.abort)

    @app.post(PREFIX + "/uploads", status_code=201)
    async def start_upload(request: Request, who: Who) -> ent.UploadOut:
        """Send bytes first and name them after, as OCI registries take a blob whose client
        learns its digest only once it has sent it: the bytes are kept aside, visible to no
        one, and their digest and size returned. A variant upload with `upload=<id>` and the
        digest the client computed publishes them; unclaimed, they go after an hour."""
        auth.check_write_scope(who)
        writer = await run_in_threadpool(blobs.writer)
        try:
            size = await _receive(request, writer)
            upload = uploads.add(writer, who.name)
        except BaseException:
            await run_in_threadpool(writer.abort)
            raise
        return ent.UploadOut(upload=upload, digest=writer.digest, size=size)

    @app.get(VARIANT)
    def get_variant(who: Who, model: ModelName, number: Number, key: Key) -> ent.VariantOut:
        auth.check_read(who, model)
        return store.get_variant(model, number, key)

    @app.api_route(VARIANT + "/artifact", methods=["GET", "HEAD"])
    def download(
        request: Request,
        who: Who,
        model: ModelName,
        number: Number,
        key: Key,
        range_header: Annotated[str | None, Header(alias="range")] = None,
    ) -> Response:
        """The artifact's bytes; a `Range: bytes=…` request gets 206 and just those bytes,
        so a pull that broke off resumes where it stopped."""
        auth.check_read(who, model)
        variant = store.get_variant(model, number, key)
        return _download(blobs, variant, range_header, request.method == "HEAD")

    @app.get(VARIANT + "/config.pbtxt")
    def triton_config(who: Who, model: ModelName, number: Number, key: Key) -> PlainTextResponse:
        """The variant's Triton model configuration, as the Triton-layout export writes it."""
        auth.check_read(who, model)
        return PlainTextResponse(
            config_pbtxt(store.get_model(model), store.get_variant(model, number, key))
        )

    @app.put(VARIANT + "/report")
    def set_report(
        who: Who, model: ModelName, number: Number, key: Key, report: ent.Report
    ) -> ent.VariantOut:
        auth.check_write(who, model)
        return store.set_report(who.name, model, number, key, report)

    @app.put(VARIANT + "/benchmarks")
    def set_benchmarks(
        who: Who, model: ModelName, number: Number, key: Key, results: dict[str, dict[str, Any]]
    ) -> ent.VariantOut:
        """Benchmark results by the profile they were measured on; merged into those stored."""
        auth.check_write(who, model)
        for profile in results:
            if not is_known_profile(profile):
                raise InvalidArgument(f"profile {profile!r} is not a known hardware profile")
        return store.set_benchmarks(who.name, model, number, key, results)

    @app.put(PREFIX + "/models/{model}/aliases/{alias}")
    def set_alias(
        who: Who, model: ModelName, alias: Annotated[str, Path(max_length=63)], spec: ent.AliasSet
    ) -> ent.ModelOut:
        auth.check_write(who, model)
        return store.set_alias(who.name, model, alias, spec)

    @app.delete(PREFIX + "/models/{model}/aliases/{alias}", status_code=204)
    def delete_alias(who: Who, model: ModelName, alias: str) -> Response:
        auth.check_write(who, model)
        store.delete_alias(who.name, model, alias)
        return Response(status_code=204)

    @app.get(PREFIX + "/models/{model}/resolve")
    def resolve(
        who: Who,
        model: ModelName,
        ref: Annotated[str, Query(description="an alias, a version number or 'latest'")],
        profile: Annotated[list[str], Query(description="the node's profiles, best first")],
        runtime: Annotated[list[str], Query(description="the runtimes the node has")],
    ) -> ent.Resolved:
        auth.check_read(who, model)
        return store.resolve(model, ref, profile, runtime)

    @app.get(PREFIX + "/events")
    def events(
        who: Who,
        after: Annotated[int, Query(ge=0)] = 0,
        model: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    ) -> list[ent.EventOut]:
        """The event log after a cursor (an event id), oldest first."""
        auth.check_read(who, model)
        return store.events(after, model, limit, who.models)

    @app.get(PREFIX + "/events/cursor")
    def cursor(who: Who) -> dict[str, int]:
        """The newest event's id (0 when there is none): where a watch that starts now
        resumes from."""
        auth.check_read(who)
        return {"cursor": store.cursor()}

    @app.get(PREFIX + "/events/stream")
    async def stream(
        who: Who,
        after: Annotated[int, Query(ge=0)] = 0,
        model: str | None = None,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> EventSourceResponse:
        """The event log as server-sent events, from a cursor on, then live. Each event's
        `id` is its cursor: a client that reconnects with Last-Event-ID misses nothing."""
        auth.check_read(who, model)
        cursor = after
        if last_event_id is not None:
            if not last_event_id.isdigit():
                raise InvalidArgument(f"Last-Event-ID {last_event_id!r} is not an event id")
            cursor = int(last_event_id)

        async def events_from(cursor: int) -> AsyncIterator[dict[str, Any]]:
            while True:
                wake = hub.current()  # taken before reading: a commit after it wakes us
                rows = await run_in_threadpool(store.events, cursor, model, 500, who.models)
                for row in rows:
                    cursor = row.id
                    if who.may_see(row.model):
                        yield {"id": str(row.id), "event": row.kind, "data": row.model_dump_json()}
                if not rows:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), STREAM_IDLE_S)

        return EventSourceResponse(events_from(cursor), ping=10)

    return app


async def _receive(request: Request, writer: BlobWriter) -> int:
    """Stream the request body into a blob writer; returns its size. The bytes are hashed
    on one thread and written on another, each in order, while the event loop goes on
    receiving (a few MiB ahead at most)."""
    loop = asyncio.get_running_loop()
    declared = request.headers.get("content-length")
    with ThreadPoolExecutor(1, "hash") as hasher, ThreadPoolExecutor(1, "store") as storer:
        steps: deque[asyncio.Future[None]] = deque()
        received, pending, pending_size = 0, list[bytes](), 0
        try:
            async for chunk in request.stream():
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= CHUNK:  # handed over as received, not joined (no copy)
                    steps.append(loop.run_in_executor(hasher, _each, writer.hash, pending))
                    steps.append(loop.run_in_executor(storer, _each, writer.store, pending))
                    received += pending_size
                    pending, pending_size = [], 0
                    while len(steps) > 2 * UPLOAD_AHEAD_CHUNKS:
                        await steps.popleft()
            if pending:
                steps.append(loop.run_in_executor(hasher, _each, writer.hash, pending))
                steps.append(loop.run_in_executor(storer, _each, writer.store, pending))
            while steps:
                await steps.popleft()
        except ClientDisconnect:
            raise InvalidArgument(
                f"the upload was cut short after {received + pending_size} bytes; "
                "nothing was stored"
            ) from None
        finally:
            await asyncio.gather(*steps, return_exceptions=True)
    if declared is not None and declared.isdigit() and int(declared) != writer.size:
        raise InvalidArgument(f"the upload has {writer.size} bytes, not the {declared} it declared")
    return writer.size


def _each(step: Callable[[bytes], None], chunks: list[bytes]) -> None:
    for chunk in chunks:
        step(chunk)


def _check_archive(blobs: BlobStore, digest: str) -> None:
    """A tar artifact holds regular files and directories only, each inside the version
    directory (no absolute names, no '..', no links or devices), as a tree that extracts:
    no name twice, nothing under a file's name."""
    reader = _IterReader(blobs.read(digest))
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as archive:  # type: ignore[call-overload]
            count = 0
            paths = ArchivePaths()
            for member in archive:
                paths.add(member)
                count += 1
    except tarfile.TarError as exc:
        raise InvalidArgument(f"the artifact is not a readable tar archive: {exc}") from exc
    if count == 0:
        raise InvalidArgument("the tar artifact holds no files")


class _IterReader:
    """A file object over an iterator of chunks, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _download(
    blobs: BlobStore, variant: ent.VariantOut, range_header: str | None, head: bool
) -> Response:
    size = variant.size
    headers = {
        "accept-ranges": "bytes",
        "etag": f'"{variant.digest}"',
        "x-kapi-digest": variant.digest,
        "content-disposition": f'attachment; filename="{variant.filename}"',
    }
    start, end, status = 0, size, 200
    if range_header is not None:
        match = _RANGE.fullmatch(range_header.strip())
        backwards = match is not None and match[1] and match[2] and int(match[2]) < int(match[1])
        # One range; several, or one that ends before it starts, are ignored (RFC 9110 14.2).
        if match and (match[1] or match[2]) and not backwards:
            if match[1]:
                start = int(match[1])
                end = min(size, int(match[2]) + 1) if match[2] else size
            else:
                start = max(0, size - int(match[2]))
            if start >= size or start >= end:
                return Response(
                    status_code=416,
                    headers={"content-range": f"bytes */{size}", **headers},
                )
            status = 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    if head:
        return Response(status_code=status, media_type="application/octet-stream", headers=headers)
    return StreamingResponse(
        iterate_in_threadpool(blobs.read(variant.digest, start, end)),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )


def _check_requirements(model: str, document: dict[str, Any]) -> None:
    """A requirements spec that parses, and is this model's."""
    from kapi.core.requirements import parse_requirements

    spec = parse_requirements(document)
    if spec.model != model:
        raise InvalidArgument(f"the requirements are model '{spec.model}'s, not '{model}'s")
