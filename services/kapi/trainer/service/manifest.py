"""The Kubernetes objects of a job: the batch/v1 Job that runs it (built here, as objects
of the `kubernetes` client), and its state read back from the Job's status."""

from __future__ import annotations

import re

from kapi.core.errors import InvalidArgument, MissingExtra
from kapi.trainer.service.jobs import JobRecord, JobState
from kapi.trainer.service.settings import JobServiceSettings

try:
    from kubernetes import client
except ImportError as exc:  # pragma: no cover - the client is there wherever tests run
    raise MissingExtra("kubernetes", "trainer") from exc

JOB_ID = "kapi.dev/job-id"
JOB_KIND = "kapi.dev/job-kind"
CONTAINER = "kapi"
VOLUME = "data"
GPU = "nvidia.com/gpu"


def job_name(job: JobRecord) -> str:
    return dns_label(f"kapi-{job.kind}-{job.id}")


def dns_label(text: str) -> str:
    """Lowercase letters, digits and '-', 63 at most, a letter or digit at each end."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-") or "kapi-job"


def managed_by(settings: JobServiceSettings) -> str:
    """The label value of the Jobs a service manages (and lists): kapi-trainer, say."""
    return f"kapi-{settings.service}"


def labels(job: JobRecord, settings: JobServiceSettings) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kapi",
        "app.kubernetes.io/component": f"{settings.service}-job",
        "app.kubernetes.io/managed-by": managed_by(settings),
        JOB_ID: job.id,
        JOB_KIND: dns_label(job.kind),
    }


def build_job(job: JobRecord, settings: JobServiceSettings) -> client.V1Job:
    """The Job that runs `job.command` (the records' paths are the pod's paths too)."""
    if not settings.pvc:
        raise InvalidArgument("the kubernetes executor needs pvc, the data volume's claim")
    gpus = job.spec.gpus()
    container = client.V1Container(
        name=CONTAINER,
        image=settings.image,
        image_pull_policy=settings.image_pull_policy,
        command=[job.command[0]],
        args=job.command[1:],
        env=[
            client.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
            client.V1EnvVar(name="KAPI_JOB_ID", value=job.id),
        ],
        resources=resources(job, settings),
        volume_mounts=[client.V1VolumeMount(name=VOLUME, mount_path=str(settings.data))],
        working_dir=str(settings.jobs / job.id),
        security_context=client.V1SecurityContext(allow_privilege_escalation=False),
    )
    pod = client.V1PodSpec(
        restart_policy="Never",
        containers=[container],
        volumes=[
            client.V1Volume(
                name=VOLUME,
                persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                    claim_name=settings.pvc
                ),
            )
        ],
        service_account_name=settings.service_account,
        runtime_class_name=settings.gpu_runtime_class if gpus else None,
        tolerations=[client.V1Toleration(key=GPU, operator="Exists", effect="NoSchedule")]
        if gpus
        else None,
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name=job_name(job),
            namespace=settings.namespace,
            labels=labels(job, settings),
            annotations={JOB_ID: job.id, JOB_KIND: job.kind},
        ),
        spec=client.V1JobSpec(
            backoff_limit=0,
            ttl_seconds_after_finished=settings.ttl_s,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels(job, settings)), spec=pod
            ),
        ),
    )


def resources(job: JobRecord, settings: JobServiceSettings) -> client.V1ResourceRequirements:
    """The settings' requests and limits; what the job asks for is both its request and
    its limit. GPUs are limits alone, as extended resources are."""
    asked = job.spec.resources
    requests = {
        "cpu": asked.cpu or settings.cpu_request,
        "memory": asked.memory or settings.memory_request,
    }
    limits = {
        "cpu": asked.cpu or settings.cpu_limit,
        "memory": asked.memory or settings.memory_limit,
    }
    if gpus := job.spec.gpus():
        limits[GPU] = str(gpus)
    return client.V1ResourceRequirements(
        requests=requests, limits={key: value for key, value in limits.items() if value}
    )


def state_of(status: client.V1JobStatus | None) -> JobState:
    """A Job's status as a job's state (a pod not ready yet: queued)."""
    if status is None:
        return "queued"
    for condition in status.conditions or []:
        if condition.status == "True" and condition.type == "Complete":
            return "succeeded"
        if condition.status == "True" and condition.type == "Failed":
            return "failed"
    if status.ready or (status.active and status.ready is None):
        return "running"
    return "queued"


def failure_of(status: client.V1JobStatus | None) -> str | None:
    """The Job's own words for its failure (BackoffLimitExceeded: ...)."""
    for condition in (status.conditions if status else None) or []:
        if condition.type == "Failed" and condition.status == "True":
            return ": ".join(part for part in (condition.reason, condition.message) if part)
    return None
