"""Jobs as processes on this machine: `python -m kapi.cli ...` in a process group of its
own, its stdout and stderr into the job's log file, at most `concurrency` at a time (the
others wait in order, queued).

Cancel sends SIGTERM to the group and SIGKILL after `cancel_grace_s`. The service's own end
stops the jobs it runs the same way (they fail: "the service stopped"), and keeps the queued
ones queued for its next start. A service that died without that finds, at its next start,
the jobs it had running: their processes (if they still run) are killed and the jobs failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kapi.trainer.service.executor import LOG_CHUNK, TAIL, Executor, last_line, now
from kapi.trainer.service.jobs import JobRecord, JobState
from kapi.trainer.service.settings import JobServiceSettings
from kapi.trainer.service.store import JobStore

log = logging.getLogger(__name__)
SERVICE_STOPPED = "the service stopped while the job ran"
REAP_TIMEOUT_S = 10.0  # for a killed process of a previous run of the service to be gone


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, settings: JobServiceSettings, store: JobStore) -> None:
        super().__init__(settings, store)
        self._slots = asyncio.Semaphore(settings.concurrency)
        # One thread per running job waits for its process, so waits never queue behind
        # other work in the default pool.
        self._waiters = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="job-wait")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = False

    async def start(self) -> None:
        await super().start()
        for job in self.store.select("running"):
            await asyncio.to_thread(_kill_leftover, job.handle)
            await self._finish(job, "failed", None, f"{SERVICE_STOPPED} (found at its restart)")
        for job in self.store.select("queued"):
            await self._launch(job)

    async def stop(self) -> None:
        self._stopping = True
        for job_id, task in list(self._tasks.items()):
            if self.store.get(job_id).state == "queued":
                task.cancel()  # it stays queued, for the next start (a running one ends)
        for process in list(self._processes.values()):
            self._signal(process, signal.SIGTERM)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=self.settings.cancel_grace_s)
        for process in list(self._processes.values()):
            self._signal(process, signal.SIGKILL)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        self._waiters.shutdown(wait=False)

    async def _launch(self, job: JobRecord) -> None:
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))

    async def _run(self, job: JobRecord) -> None:
        async with self._slots:
            if job.finished or self._stopping:  # cancelled while it waited
                return
            try:
                process = self._spawn(job)
            except OSError as exc:
                await self._finish(job, "failed", None, f"the job could not start: {exc}")
                return
            self._processes[job.id] = process
            try:
                job.state, job.started_at = "running", now()
                job.handle = f"pid {process.pid} {_start_time(process.pid)}"
                await self.store.save(job)
                loop = asyncio.get_running_loop()
                code = await loop.run_in_executor(self._waiters, process.wait)
                self._signal_group(process.pid, signal.SIGKILL)  # whatever it started
            finally:
                del self._processes[job.id]
            await self._finish(job, *await self._outcome(job, code))

    def _spawn(self, job: JobRecord) -> subprocess.Popen[bytes]:
        folder = self.store.folder(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        with self.log_path(job.id).open("ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", "kapi.cli", *job.command[1:]],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "KAPI_JOB_ID": job.id},
                start_new_session=True,  # its own process group, signalled as one
            )

    async def _outcome(self, job: JobRecord, code: int) -> tuple[JobState, int, str | None]:
        if code == 0:
            return "succeeded", code, None
        if job.cancel_requested_at is not None:
            return "cancelled", code, "cancelled on request"
        if self._stopping:
            return "failed", code, SERVICE_STOPPED
        if code < 0:
            return "failed", code, f"killed by {signal.Signals(-code).name}"
        return "failed", code, last_line(await self._log_tail(job)) or f"exit code {code}"

    async def _stop(self, job: JobRecord) -> None:
        process = self._processes.get(job.id)
        if process is None:  # queued: it never runs
            await self._finish(job, "cancelled", None, "cancelled on request before it started")
            return
        self._signal(process, signal.SIGTERM)
        asyncio.get_running_loop().call_later(
            self.settings.cancel_grace_s, self._signal, process, signal.SIGKILL
        )

    def _signal(self, process: subprocess.Popen[bytes], number: signal.Signals) -> None:
        if process.returncode is None:  # not reaped: its group is still its own
            self._signal_group(process.pid, number)

    @staticmethod
    def _signal_group(pgid: int, number: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, number)

    async def _read_log(self, job: JobRecord, offset: int) -> bytes:
        return await asyncio.to_thread(_read, self.log_path(job.id), offset, LOG_CHUNK)

    async def _log_tail(self, job: JobRecord) -> str:
        path = self.log_path(job.id)
        size = await asyncio.to_thread(lambda: path.stat().st_size if path.exists() else 0)
        tail = await asyncio.to_thread(_read, path, max(0, size - TAIL), TAIL)
        return tail.decode(errors="replace")


def _read(path: Path, offset: int, size: int) -> bytes:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read(size)
    except FileNotFoundError:
        return b""


def _start_time(pid: int) -> str:
    """When the process started, in clock ticks after boot (Linux); '?' where unknown. With
    the pid, it tells the process from a later one that got the same pid."""
    fields = _stat(pid)
    return fields[19] if fields else "?"


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command's name (state, ppid, pgrp, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _kill_leftover(handle: str | None) -> None:
    """Kill the process group of a job that a previous run of the service started, and wait
    until it is gone (so its staging can be removed). A pid that is some other process now
    is left alone; a group id stays taken while any of its processes lives."""
    if handle is None or not handle.startswith("pid "):
        return
    _, pid_text, started = handle.split()
    pid = int(pid_text)
    if _stat(pid) is not None and _start_time(pid) != started:
        return  # the leader is gone and its pid taken: its group is gone too
    if not _group(pid):
        return
    log.warning("killing the processes of a job the service lost", extra={"pgid": pid})
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while _group(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)
    if _group(pid):
        log.error("a lost job's processes did not die", extra={"pgid": pid})
