"""`kapi trainer serve`, `kapi optimizer serve`: the job API on uvicorn, over the
configured executor."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from kapi.trainer.service.app import create_app
from kapi.trainer.service.executor import open_executor
from kapi.trainer.service.jobs import kind_names
from kapi.trainer.service.settings import JobServiceSettings
from kapi.trainer.service.store import JobStore

log = logging.getLogger(__name__)
# How long open log streams may hold up a stop before they are cut.
GRACEFUL_SHUTDOWN_S = 5


def build_app(settings: JobServiceSettings) -> FastAPI:
    settings.datasets.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.jobs, kind_names(settings.kinds))
    executor = open_executor(settings, store)
    log.info(
        f"{settings.service} job service ready",
        extra={"executor": settings.executor, "jobs": str(settings.jobs),
               "datasets": str(settings.datasets), "kinds": kind_names(settings.kinds)},
    )  # fmt: skip
    return create_app(executor)


def serve(settings: JobServiceSettings) -> None:
    config = uvicorn.Config(
        build_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    uvicorn.Server(config).run()
