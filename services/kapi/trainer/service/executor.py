"""The job service below its API: what every executor shares (records, cancel's rules,
following a log, cleaning up after a job that did not succeed) and the one choice each makes,
how a job is run (`_launch`, `_stop`, `_read_log`).

An executor is chosen by name (`EXECUTORS`) from the settings, and runs the kinds of job
they name.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from kapi.core.errors import Conflict, InvalidArgument
from kapi.trainer.service.jobs import JobPlace, JobRecord, JobSpec, JobState, kind_names
from kapi.trainer.service.settings import JobServiceSettings
from kapi.trainer.service.staging import remove_staging
from kapi.trainer.service.store import JobStore

log = logging.getLogger(__name__)
LOG_CHUNK = 64 * 1024
LOG_POLL_S = 0.2  # how often a followed log of a job that has not ended is read again
TAIL = 8 * 1024  # what is read of a log's end for the reason a job failed

EXECUTORS = {
    "local": "kapi.trainer.service.local:LocalExecutor",
    "kubernetes": "kapi.trainer.service.kubernetes:KubernetesExecutor",
}


def now() -> datetime:
    return datetime.now(UTC)


class Executor(ABC):
    name: ClassVar[str]

    def __init__(self, settings: JobServiceSettings, store: JobStore) -> None:
        self.settings = settings
        self.store = store

    @classmethod
    def from_settings(cls, settings: JobServiceSettings, store: JobStore) -> Executor:
        return cls(settings, store)

    def place(self, job_id: str) -> JobPlace:
        return JobPlace(root=self.settings.datasets, out=self.store.folder(job_id))

    def log_path(self, job_id: str) -> Path:
        return self.store.folder(job_id) / "log"

    async def start(self) -> None:
        """Take up the jobs a previous run of the service left unfinished; those another
        executor ran are failed, as nothing will follow them."""
        for job in self.store.select():
            if not job.finished and job.executor != self.name:
                reason = f"it ran on the {job.executor} executor, which the service left"
                await self._finish(job, "failed", None, reason)

    async def stop(self) -> None:
        """Before the service exits."""

    async def submit(self, spec: JobSpec) -> JobRecord:
        """Record the job and start (or queue) it. A kind the service does not run is
        refused (InvalidArgument); paths outside its folders too (SpecRefused)."""
        if not isinstance(spec, self.settings.kinds):
            kinds = ", ".join(kind_names(self.settings.kinds))
            raise InvalidArgument(
                f"the {self.settings.service} service does not run {spec.kind} jobs, only {kinds}"
            )
        spec = spec.with_inputs(self.settings.inputs)
        job_id = self.store.new_id()
        job = JobRecord(
            id=job_id,
            kind=spec.kind,
            spec=spec,
            executor=self.name,
            command=["kapi", *spec.argv(self.place(job_id))],
            created_at=now(),
        )
        await self.store.save(job)
        for name, text in spec.files().items():
            (self.place(job_id).out / name).write_text(text)
        log.info("job submitted", extra={"job": job.id, "kind": job.kind})
        await self._launch(job)
        return job

    async def cancel(self, job_id: str) -> JobRecord:
        """Ask a queued or running job to stop; its state says when it has."""
        job = self.store.get(job_id)
        if job.finished:
            raise Conflict(
                f"job '{job_id}' has ended ({job.state}); only a queued or running job can be "
                "cancelled"
            )
        if job.cancel_requested_at is None:
            job.cancel_requested_at = now()
            await self.store.save(job)
            log.info("job cancel requested", extra={"job": job.id, "state": job.state})
            await self._stop(job)
        return job

    async def log_chunks(self, job_id: str, follow: bool) -> AsyncIterator[bytes]:
        """The job's log; with `follow`, as it is written, until the job has ended."""
        job = self.store.get(job_id)
        offset = 0
        while True:
            ended = self.store.get(job_id).finished  # before the read: nothing is missed
            chunk = await self._read_log(job, offset)
            if chunk:
                offset += len(chunk)
                yield chunk
            elif ended or not follow:
                return
            else:
                await asyncio.sleep(LOG_POLL_S)

    async def _finish(
        self, job: JobRecord, state: JobState, exit_code: int | None, reason: str | None
    ) -> None:
        """Record how a job ended; one that did not succeed leaves no staging behind."""
        place = self.place(job.id)
        result = None
        if state == "succeeded":
            result = job.spec.result(place, await self._log_tail(job))
            if result is None:
                state, reason = "failed", "it exited 0 but its result is not where it belongs"
        else:
            await self._clean_up(job)
        job.state, job.exit_code, job.reason = state, exit_code, reason
        job.result = str(result) if result is not None else None
        job.finished_at = now()
        await self.store.save(job)
        log.info("job ended", extra={"job": job.id, "state": state, "reason": reason})

    async def _clean_up(self, job: JobRecord) -> None:
        """Remove what the job was writing aside; its processes are gone."""
        await asyncio.to_thread(remove_staging, job.spec.staging(self.place(job.id)))

    async def _log_tail(self, job: JobRecord) -> str:
        text = b""
        offset = 0
        while chunk := await self._read_log(job, offset):
            offset += len(chunk)
            text = (text + chunk)[-TAIL:]
        return text.decode(errors="replace")

    @abstractmethod
    async def _launch(self, job: JobRecord) -> None:
        """Start the job, or queue it; return at once."""

    @abstractmethod
    async def _stop(self, job: JobRecord) -> None:
        """Stop a queued or running job that was asked to be cancelled."""

    @abstractmethod
    async def _read_log(self, job: JobRecord, offset: int) -> bytes:
        """Up to LOG_CHUNK bytes of the job's log from `offset`; b"": none yet, or no more."""


def last_line(log_text: str) -> str | None:
    """The last line a job printed: the error line of a command that failed."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def open_executor(settings: JobServiceSettings, store: JobStore) -> Executor:
    module, _, name = EXECUTORS[settings.executor].partition(":")
    executor: type[Executor] = getattr(importlib.import_module(module), name)
    return executor.from_settings(settings, store)
