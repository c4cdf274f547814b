"""The trainer's job API (FastAPI; OpenAPI docs at /docs), under /v1.

Errors are JSON `{"detail": ...}`: 404 an unknown job, 409 cancelling a job that has ended,
422 a spec that does not validate (FastAPI's list of what was wrong, where).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Body, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kapi.core.errors import KapiError
from kapi.trainer.service.executor import Executor
from kapi.trainer.service.jobs import JobRecord, JobSpec, JobState

PREFIX = "/v1"
JobId = Annotated[str, Path(max_length=64, description="the id the submit answered with")]
Follow = Annotated[bool, Query(description="stream the log as written until the job ends")]


def create_app(executor: Executor) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await executor.start()
        try:
            yield
        finally:
            await executor.stop()
            executor.store.close()

    app = FastAPI(
        title="kapi trainer jobs",
        version="1",
        lifespan=lifespan,
        description="Ingest datasets and train models as jobs: submit, status, logs, cancel.",
    )

    @app.exception_handler(KapiError)
    async def _kapi_error(_: Request, exc: KapiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.http_status)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.post(PREFIX + "/jobs", status_code=201)
    async def submit(spec: Annotated[JobSpec, Body()], response: Response) -> JobRecord:
        """Validate a job (its `kind` and that kind's options) and queue it."""
        job = await executor.submit(spec)
        response.headers["location"] = f"{PREFIX}/jobs/{job.id}"
        return job

    @app.get(PREFIX + "/jobs")
    async def list_jobs(
        state: Annotated[JobState | None, Query()] = None,
        kind: Annotated[str | None, Query(max_length=32)] = None,
    ) -> list[JobRecord]:
        """Every job, oldest first; `state` and `kind` keep only those."""
        return executor.store.select(state, kind)

    @app.get(PREFIX + "/jobs/{job_id}")
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

    @app.post(PREFIX + "/jobs/{job_id}/cancel", status_code=202)
    async def cancel(job_id: JobId) -> JobRecord:
        """Stop a queued or running job; it is `cancelled` once its process is gone."""
        return await executor.cancel(job_id)

    return app
