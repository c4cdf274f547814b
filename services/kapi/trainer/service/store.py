"""The job records: one JSON file per job, `JOBS/<id>/job.json`, replaced in one step on
every change, so that a restarted service finds every job as it last was.

The records live in memory too, and change only on the event loop; the writes go through
one thread, in the order they were asked for, so an older state never lands last.

A store given `kinds` keeps to the records of those: services that share a data folder (the
trainer's and the optimizer's) each see, run and answer for their own jobs alone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydantic

from kapi.core.errors import NotFound
from kapi.core.files import replace_text
from kapi.trainer.service.jobs import JobRecord, JobState

log = logging.getLogger(__name__)
RECORD = "job.json"


class JobStore:
    def __init__(self, directory: Path, kinds: Collection[str] | None = None) -> None:
        self.directory = directory
        self.kinds = frozenset(kinds) if kinds is not None else None
        directory.mkdir(parents=True, exist_ok=True)
        self._jobs = {job.id: job for job in self._load()}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-records")

    def new_id(self) -> str:
        """12 hex digits: unique here, and fit for a Kubernetes name."""
        while (job_id := secrets.token_hex(6)) in self._jobs or (self.directory / job_id).exists():
            pass
        return job_id

    def folder(self, job_id: str) -> Path:
        return self.directory / job_id

    def get(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job '{job_id}' is unknown")
        return job

    def select(self, state: JobState | None = None, kind: str | None = None) -> list[JobRecord]:
        """Oldest first."""
        jobs = sorted(self._jobs.values(), key=lambda job: (job.created_at, job.id))
        return [
            job
            for job in jobs
            if (state is None or job.state == state) and (kind is None or job.kind == kind)
        ]

    async def save(self, job: JobRecord) -> None:
        self._jobs[job.id] = job
        document = job.model_dump_json(indent=2)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, _replace, self.folder(job.id) / RECORD, document)

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def _load(self) -> list[JobRecord]:
        jobs = []
        for path in sorted(self.directory.glob(f"*/{RECORD}")):
            try:
                job = JobRecord.model_validate_json(path.read_bytes())
            except (OSError, pydantic.ValidationError) as exc:  # kept, never overwritten
                log.warning("a job record cannot be read", extra={"path": str(path), "error": exc})
                continue
            if self.kinds is None or job.kind in self.kinds:  # another service's otherwise
                jobs.append(job)
        return jobs


def _replace(path: Path, document: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, document + "\n")
