"""Jobs as Kubernetes Jobs (batch/v1), through the `kubernetes` client.

A job is one Job running the image's `kapi` with the job's arguments, with the data volume
(the claim `pvc`) mounted at the service's DATA: the same paths as the service's, so that
the records, the datasets and the outputs are where both expect them, and the service can
clean up after a Job that did not succeed (the claim must then be ReadWriteMany, or both on
one node). No retries (backoffLimit 0, restartPolicy Never): a failed job is failed, as
locally. A finished Job goes after ttlSecondsAfterFinished; its log is kept in DATA first.

The service reads every Job it manages in one list call each `poll_s`, and maps its status
to the job's state; cancel deletes the Job (its pods in the background), and the staging
is removed once the pods are gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kapi.core.errors import MissingExtra, Unavailable
from kapi.trainer.service.executor import LOG_CHUNK, Executor, last_line, now
from kapi.trainer.service.jobs import JobRecord, JobState
from kapi.trainer.service.manifest import (
    CONTAINER,
    JOB_ID,
    build_job,
    failure_of,
    job_name,
    managed_by,
    state_of,
)
from kapi.trainer.service.settings import JobServiceSettings
from kapi.trainer.service.staging import remove_staging
from kapi.trainer.service.store import JobStore

try:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException
except ImportError as exc:  # pragma: no cover - the client is there wherever tests run
    raise MissingExtra("kubernetes", "trainer") from exc

log = logging.getLogger(__name__)
PODS_GONE_TIMEOUT_S = 300.0  # a deleted Job's pods: terminationGracePeriodSeconds and more


class KubernetesExecutor(Executor):
    name = "kubernetes"

    def __init__(
        self,
        settings: JobServiceSettings,
        store: JobStore,
        batch: client.BatchV1Api,
        core: client.CoreV1Api,
    ) -> None:
        super().__init__(settings, store)
        self.batch = batch
        self.core = core
        self._logs: dict[str, bytes] = {}  # the last read of each job's pod log
        self._poller: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: JobServiceSettings, store: JobStore) -> Executor:
        try:
            # ~/.kube/config (or $KUBECONFIG) where there is one, else the pod's account.
            config.load_config()  # type: ignore[no-untyped-call]
        except ConfigException as exc:
            raise Unavailable(f"no Kubernetes configuration: {exc}") from exc
        api = client.ApiClient()
        return cls(settings, store, client.BatchV1Api(api), client.CoreV1Api(api))

    async def start(self) -> None:
        await super().start()
        self._poller = asyncio.create_task(self._poll(), name="kubernetes-jobs")

    async def stop(self) -> None:
        """The Jobs go on in the cluster; the next start follows them again."""
        tasks = [*self._cleanups, *([self._poller] if self._poller else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _launch(self, job: JobRecord) -> None:
        body = build_job(job, self.settings)
        self.store.folder(job.id).mkdir(parents=True, exist_ok=True)  # the pod's working dir
        try:
            await asyncio.to_thread(self.batch.create_namespaced_job, self.settings.namespace, body)
        except ApiException as exc:
            await self._finish(job, "failed", None, f"Kubernetes refused the Job: {_why(exc)}")
            return
        job.handle = f"{self.settings.namespace}/{job_name(job)}"
        await self.store.save(job)

    async def _stop(self, job: JobRecord) -> None:
        try:
            await asyncio.to_thread(
                self.batch.delete_namespaced_job,
                job_name(job),
                self.settings.namespace,
                propagation_policy="Background",
            )
        except ApiException as exc:
            if exc.status != 404:  # gone already: nothing to stop
                raise Unavailable(f"Kubernetes did not delete the Job: {_why(exc)}") from exc
        await self._finish(job, "cancelled", None, "cancelled on request")

    async def poll_once(self) -> None:
        """Bring every unfinished job's record up to its Job's status."""
        unfinished = [job for job in self.store.select() if not job.finished]
        if not unfinished:
            return
        listed = await asyncio.to_thread(
            self.batch.list_namespaced_job,
            self.settings.namespace,
            label_selector=f"app.kubernetes.io/managed-by={managed_by(self.settings)}",
        )
        found = {_label(item, JOB_ID): item for item in listed.items}
        for job in unfinished:
            item = found.get(job.id)
            if item is None:
                reason = f"its Kubernetes Job {job.handle or job_name(job)} is gone"
                await self._finish(job, "failed", None, reason)
            else:
                await self._update(job, item)

    async def _update(self, job: JobRecord, item: client.V1Job) -> None:
        state = state_of(item.status)
        if state == job.state or state == "queued":
            return
        if job.started_at is None:
            job.started_at = (item.status.start_time if item.status else None) or now()
        if state == "running":
            job.state = "running"
            await self.store.save(job)
            return
        exit_code, terminated, text = await self._ended_pod(job)
        reason = None
        if state == "failed":
            said = terminated if terminated not in (None, "Error") else None  # OOMKilled, ...
            reason = said or last_line(text) or failure_of(item.status) or "the Job failed"
        await self._finish(job, state, exit_code, reason)

    async def _ended_pod(self, job: JobRecord) -> tuple[int | None, str | None, str]:
        """The exit code and the reason (Error, OOMKilled, ...) of the job's container, and
        its log, kept in DATA (the Job and its pod go after ttlSecondsAfterFinished)."""
        pod = await self._pod(job)
        data = await self._log_of(pod)
        await asyncio.to_thread(self.log_path(job.id).write_bytes, data)
        text = data.decode(errors="replace")
        for status in (pod.status.container_statuses if pod and pod.status else None) or []:
            ended = status.state.terminated if status.state else None
            if status.name == CONTAINER and ended is not None:
                return ended.exit_code, ended.reason, text
        return None, None, text

    async def _finish(
        self, job: JobRecord, state: JobState, exit_code: int | None, reason: str | None
    ) -> None:
        await super()._finish(job, state, exit_code, reason)
        self._logs.pop(job.id, None)

    async def _clean_up(self, job: JobRecord) -> None:
        """Once no pod of the Job can still write, in the background (a deleted Job's pods
        have their termination grace period)."""
        task = asyncio.create_task(self._clean_up_when_gone(job))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _clean_up_when_gone(self, job: JobRecord) -> None:
        deadline = time.monotonic() + PODS_GONE_TIMEOUT_S
        while time.monotonic() < deadline:
            if not await self._pods(job):
                break
            await asyncio.sleep(self.settings.poll_s)
        await asyncio.to_thread(remove_staging, job.spec.staging(self.place(job.id)))

    async def _read_log(self, job: JobRecord, offset: int) -> bytes:
        saved = self.log_path(job.id)
        if job.finished:
            data = await asyncio.to_thread(lambda: saved.read_bytes() if saved.exists() else b"")
        else:
            data = self._logs.get(job.id, b"")
            if offset >= len(data):  # read the pod's log again only once this is all sent
                data = self._logs[job.id] = await self._pod_log(job)
        return data[offset : offset + LOG_CHUNK]

    async def _pod_log(self, job: JobRecord) -> bytes:
        return await self._log_of(await self._pod(job))

    async def _log_of(self, pod: client.V1Pod | None) -> bytes:
        if pod is None or pod.metadata is None or pod.metadata.name is None:
            return b""
        try:
            text = await asyncio.to_thread(
                self.core.read_namespaced_pod_log,
                pod.metadata.name,
                self.settings.namespace,
                container=CONTAINER,
            )
        except ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or gone
                return b""
            raise Unavailable(f"Kubernetes did not give the pod's log: {_why(exc)}") from exc
        return text.encode()

    async def _pod(self, job: JobRecord) -> client.V1Pod | None:
        """The job's latest pod (there is one, with backoffLimit 0, unless it was replaced)."""
        pods = await self._pods(job)
        return max(pods, key=_created, default=None)

    async def _pods(self, job: JobRecord) -> list[client.V1Pod]:
        listed = await asyncio.to_thread(
            self.core.list_namespaced_pod,
            self.settings.namespace,
            label_selector=f"job-name={job_name(job)}",
        )
        return list(listed.items)

    async def _poll(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (ApiException, OSError) as exc:  # the API server away: try again later
                log.warning("cannot read the Kubernetes Jobs", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.poll_s)


def _label(item: client.V1Job, key: str) -> str | None:
    return ((item.metadata.labels if item.metadata else None) or {}).get(key)


def _created(pod: client.V1Pod) -> Any:
    return pod.metadata.creation_timestamp if pod.metadata else None


def _why(exc: ApiException) -> str:
    return f"{exc.status} {exc.reason}: {exc.body or ''}".strip().rstrip(":")
