"""A job service's API (FastAPI; OpenAPI docs at /docs), under /v1: the kinds of job the
service runs (its settings' `kinds`), and those alone, are what it takes and documents.

Errors are JSON `{"detail": ...}`: 404 an unknown job, 409 cancelling a job that has ended,
422 a spec that does not validate (FastAPI's list of what was wrong, where): a kind the
service does not run, or a path outside its folders, among them.
"""

# No `from __future__ import annotations`: the spec's type is the service's, made when the
# app is, and FastAPI reads the endpoints' annotations as objects.
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kapi.core.errors import KapiError
from kapi.trainer.service.executor import Executor
from kapi.trainer.service.jobs import (
    JobRecord,
    JobSpec,
    JobState,
    SpecRefused,
    record_model,
    spec_union,
)

PREFIX = "/v1"
JobId = Annotated[str, Path(max_length=64, description="the id the submit answered with")]
Follow = Annotated[bool, Query(description="stream the log as written until the job ends")]


def create_app(executor: Executor) -> FastAPI:
    settings = executor.settings

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await executor.start()
        try:
            yield
        finally:
            await executor.stop()
            executor.store.close()

    app = FastAPI(
        title=f"kapi {settings.service} jobs",
        version="1",
        lifespan=lifespan,
        description=settings.about,
    )
    spec_type: Any = spec_union(settings.kinds)
    record: Any = record_model(settings.kinds)

    @app.exception_handler(KapiError)
    async def _kapi_error(_: Request, exc: KapiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.http_status)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.post(PREFIX + "/jobs", status_code=201, response_model=record)
    async def submit(spec: Annotated[spec_type, Body()], response: Response) -> JobRecord:
        """Validate a job (its `kind` and that kind's options) and queue it."""
        job = await _submit(executor, spec)
        response.headers["location"] = f"{PREFIX}/jobs/{job.id}"
        return job

    @app.get(PREFIX + "/jobs", response_model=list[record])
    async def list_jobs(
        state: Annotated[JobState | None, Query()] = None,
        kind: Annotated[str | None, Query(max_length=32)] = None,
    ) -> list[JobRecord]:
        """Every job, oldest first; `state` and `kind` keep only those."""
        return executor.store.select(state, kind)

    @app.get(PREFIX + "/jobs/{job_id}", response_model=record)
    async def get_job(job_id: JobId) -> JobRecord:
        return executor.store.get(job_id)

    @app.get(
        PREFIX + "/jobs/{job_id}/logs",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def logs(job_id: JobId, follow: Follow = False) -> StreamingResponse:
        """What the job printed (stdout and stderr)."""
        executor.store.get(job_id)  # 404 before the stream starts
        return StreamingResponse(
            executor.log_chunks(job_id, follow), media_type="text/plain; charset=utf-8"
        )

    @app.post(PREFIX + "/jobs/{job_id}/cancel", status_code=202, response_model=record)
    async def cancel(job_id: JobId) -> JobRecord:
        """Stop a queued or running job; it is `cancelled` once its process is gone."""
        return await executor.cancel(job_id)

    return app


async def _submit(executor: Executor, spec: JobSpec) -> JobRecord:
    """The executor's submit; paths it refuses are a 422 where the spec names them, as
    FastAPI words a spec that does not validate."""
    try:
        return await executor.submit(spec)
    except SpecRefused as exc:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": _where(executor, spec, field),
                    "msg": f"Value error, {why}",
                    "input": getattr(spec, field),
                }
                for field, why in exc.problems
            ]
        ) from exc


def _where(executor: Executor, spec: JobSpec, field: str) -> tuple[str, ...]:
    """A field's place in the body, as pydantic gives it: after the kind, in a union."""
    return ("body", spec.kind, field) if len(executor.settings.kinds) > 1 else ("body", field)
