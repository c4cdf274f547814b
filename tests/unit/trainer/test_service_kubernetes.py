"""The job service's Kubernetes executor, with no cluster: the batch/v1 Jobs it builds,
checked as objects, as the manifest the client sends (and against Kubernetes' own schema),
and its calls against BatchV1Api and CoreV1Api mocks made from the real classes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
from kapi.cli import _parser
from kapi.trainer.service.jobs import IngestJob, JobPlace, JobRecord, TrainJob
from kapi.trainer.service.kubernetes import KubernetesExecutor
from kapi.trainer.service.manifest import build_job, dns_label, state_of
from kapi.trainer.service.settings import TrainerServiceSettings
from kapi.trainer.service.store import JobStore
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

KUBERNETES_VERSION = "1.33"
STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def settings(tmp_path: Path, **overrides: Any) -> TrainerServiceSettings:
    fields: dict[str, Any] = {
        "data": tmp_path / "data",
        "executor": "kubernetes",
        "namespace": "ml",
        "image": "registry.local/kapi-trainer:1.2",
        "pvc": "kapi-data",
        **overrides,
    }
    return TrainerServiceSettings(**fields)


def record(spec: TrainJob | IngestJob, config: TrainerServiceSettings, job_id: str) -> JobRecord:
    """A record as the executor makes it on submit."""
    place = JobPlace(root=config.datasets, out=config.jobs / job_id)
    return JobRecord(
        id=job_id,
        kind=spec.kind,
        spec=spec,
        executor="kubernetes",
        command=["kapi", *spec.argv(place)],
        created_at=STARTED,
    )


def train_spec(**fields: Any) -> TrainJob:
    return TrainJob(**{"kind": "train", "dataset": "digits", "model": "small_cnn", **fields})


def container(job: client.V1Job) -> client.V1Container:
    assert job.spec is not None
    assert job.spec.template.spec is not None
    (only,) = job.spec.template.spec.containers
    return only


# the Job object


def test_a_train_job_is_a_batch_v1_job_that_runs_kapi_train_once(tmp_path: Path) -> None:
    config = settings(tmp_path)
    job = record(train_spec(epochs=3, lr=0.01), config, "0123456789ab")
    built = build_job(job, config)

    assert (built.api_version, built.kind) == ("batch/v1", "Job")
    assert built.metadata is not None
    assert built.spec is not None
    assert built.metadata.name == "kapi-train-0123456789ab"
    assert built.metadata.namespace == "ml"
    assert built.metadata.labels is not None
    assert built.metadata.labels["kapi.dev/job-id"] == "0123456789ab"
    assert built.metadata.labels["kapi.dev/job-kind"] == "train"
    assert built.metadata.labels["app.kubernetes.io/managed-by"] == "kapi-trainer"
    assert built.metadata.annotations == {
        "kapi.dev/job-id": "0123456789ab",
        "kapi.dev/job-kind": "train",
    }
    assert built.spec.backoff_limit == 0
    assert built.spec.ttl_seconds_after_finished == config.ttl_s
    template = built.spec.template
    assert template.metadata is not None
    assert template.metadata.labels == built.metadata.labels
    pod = template.spec
    assert pod is not None
    assert pod.restart_policy == "Never"
    assert pod.runtime_class_name is None
    assert pod.tolerations is None

    kapi = container(built)
    assert kapi.image == "registry.local/kapi-trainer:1.2"
    assert kapi.command == ["kapi"]
    data = tmp_path / "data"
    assert kapi.args == [
        "train", "--dataset=digits", "--epochs=3", "--lr=0.01", "--model=small_cnn",
        f"--root={data / 'datasets'}", f"--out={data / 'jobs' / '0123456789ab'}",
        "--no-progress",
    ]  # fmt: skip
    assert kapi.working_dir == str(data / "jobs" / "0123456789ab")
    assert {env.name: env.value for env in kapi.env or []} == {
        "PYTHONUNBUFFERED": "1",
        "KAPI_JOB_ID": "0123456789ab",
    }
    (mount,) = kapi.volume_mounts or []
    (volume,) = pod.volumes or []
    assert (mount.name, mount.mount_path) == (volume.name, str(data))
    assert volume.persistent_volume_claim is not None
    assert volume.persistent_volume_claim.claim_name == "kapi-data"
    assert kapi.resources is not None
    assert kapi.resources.requests == {"cpu": "1", "memory": "2Gi"}
    assert kapi.resources.limits == {"memory": "8Gi"}


def test_the_args_are_what_the_kapi_command_parses() -> None:
    """The argv mapping agrees with the real `kapi` parser, kind by kind (values that start
    with '-' stay values; the source is positional)."""
    config = TrainerServiceSettings(data=Path("/srv/kapi"))
    train = record(train_spec(batch_size=32, width=0.5, device="cuda:1", threads=2), config, "a1")
    parsed = _parser().parse_args(train.command[1:])
    assert (parsed.command, parsed.dataset, parsed.model) == ("train", "digits", "small_cnn")
    assert (parsed.batch_size, parsed.width, parsed.device, parsed.threads) == (
        32,
        0.5,
        "cuda:1",
        2,
    )
    assert parsed.out == Path("/srv/kapi/jobs/a1")
    assert parsed.no_progress

    spec = IngestJob(kind="ingest", source="-odd name.npz", name="odd", val=0.2, channels="rgb")
    ingest = record(spec, config, "b2")
    parsed = _parser().parse_args(ingest.command[1:])
    assert (parsed.command, parsed.action, parsed.source) == ("data", "ingest", "-odd name.npz")
    assert (parsed.name, parsed.val, parsed.channels) == ("odd", 0.2, "rgb")
    assert parsed.root == Path("/srv/kapi/datasets")


def test_a_job_that_asks_for_a_gpu_gets_one_and_the_nvidia_runtime(tmp_path: Path) -> None:
    config = settings(tmp_path)
    built = build_job(record(train_spec(device="cuda"), config, "c3"), config)
    assert built.spec is not None
    assert built.spec.template.spec is not None
    pod = built.spec.template.spec
    assert pod.runtime_class_name == "nvidia"
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations or []] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")
    ]
    resources = container(built).resources
    assert resources is not None
    assert resources.limits == {"memory": "8Gi", "nvidia.com/gpu": "1"}


def test_what_a_job_asks_for_is_its_request_and_its_limit(tmp_path: Path) -> None:
    config = settings(tmp_path, cpu_limit="2")
    asked = {"cpu": "4", "memory": "16Gi", "gpus": 2}
    built = build_job(record(train_spec(resources=asked), config, "d4"), config)
    resources = container(built).resources
    assert resources is not None
    assert resources.requests == {"cpu": "4", "memory": "16Gi"}
    assert resources.limits == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}


def test_the_manifest_validates_against_the_kubernetes_schema(tmp_path: Path) -> None:
    config = settings(tmp_path, service_account="trainer")
    for spec in (train_spec(device="cuda"), IngestJob(kind="ingest", source="x", name="x")):
        manifest = client.ApiClient().sanitize_for_serialization(
            build_job(record(spec, config, "e5"), config)
        )
        assert manifest["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        assert manifest["spec"]["backoffLimit"] == 0
        assert manifest["spec"]["template"]["spec"]["serviceAccountName"] == "trainer"
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    # The validator has teeth: a field Kubernetes does not know is refused.
    manifest["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_names_are_dns_labels() -> None:
    assert dns_label("kapi-Train_HPO-0123") == "kapi-train-hpo-0123"
    long = dns_label("kapi-" + "x" * 80 + "-")
    assert len(long) == 63
    assert long[-1] != "-"


def test_the_kubernetes_executor_needs_the_data_volume(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="pvc"):
        settings(tmp_path, pvc=None)
    with pytest.raises(ValidationError, match="must be under data"):
        settings(tmp_path, root=tmp_path / "elsewhere")


def test_a_job_status_maps_to_a_state() -> None:
    def status(**fields: Any) -> client.V1JobStatus:
        return client.V1JobStatus(**fields)

    def condition(kind: str) -> client.V1JobCondition:
        return client.V1JobCondition(type=kind, status="True")

    assert state_of(None) == "queued"
    assert state_of(status(active=1, ready=0)) == "queued"  # a pod pulling its image
    assert state_of(status(active=1, ready=1)) == "running"
    assert state_of(status(succeeded=1, conditions=[condition("Complete")])) == "succeeded"
    assert state_of(status(failed=1, conditions=[condition("Failed")])) == "failed"


# the executor, against the client's APIs


@pytest.fixture
async def executor(tmp_path: Path) -> AsyncIterator[KubernetesExecutor]:
    config = settings(tmp_path, poll_s=0.01)
    store = JobStore(config.jobs)
    batch = mock.create_autospec(client.BatchV1Api, instance=True)
    core = mock.create_autospec(client.CoreV1Api, instance=True)
    yield KubernetesExecutor(config, store, batch, core)
    store.close()


def listed(*jobs: client.V1Job) -> client.V1JobList:
    return client.V1JobList(items=list(jobs))


def cluster_job(built: client.V1Job, **status: Any) -> client.V1Job:
    """The Job as the API server would list it, with a status."""
    built.status = client.V1JobStatus(**status)
    return built


def pod(name: str, exit_code: int | None = None, reason: str | None = None) -> client.V1Pod:
    terminated = None
    if exit_code is not None:
        terminated = client.V1ContainerStateTerminated(exit_code=exit_code, reason=reason)
    state = client.V1ContainerState(terminated=terminated)
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, creation_timestamp=STARTED),
        status=client.V1PodStatus(
            container_statuses=[
                client.V1ContainerStatus(
                    name="kapi", image="i", image_id="", ready=False, restart_count=0, state=state
                )
            ]
        ),
    )


async def test_submit_creates_the_job_in_the_namespace(executor: KubernetesExecutor) -> None:
    job = await executor.submit(train_spec(epochs=2))
    (call,) = executor.batch.create_namespaced_job.call_args_list  # type: ignore[attr-defined]
    namespace, body = call.args
    assert namespace == "ml"
    assert body == build_job(job, executor.settings)
    assert job.state == "queued"
    assert job.handle == f"ml/kapi-train-{job.id}"
    assert executor.store.folder(job.id).is_dir()  # the pod's working directory


async def test_a_job_kubernetes_refuses_fails_with_its_answer(
    executor: KubernetesExecutor,
) -> None:
    refused = ApiException(status=403, reason="Forbidden", body="jobs.batch is forbidden")
    executor.batch.create_namespaced_job.side_effect = refused  # type: ignore[attr-defined]
    job = await executor.submit(train_spec())
    assert job.state == "failed"
    assert job.reason == "Kubernetes refused the Job: 403 Forbidden: jobs.batch is forbidden"


async def test_polling_follows_the_job_to_success_and_keeps_its_log(
    executor: KubernetesExecutor,
) -> None:
    job = await executor.submit(train_spec())
    built = build_job(job, executor.settings)
    batch: Any = executor.batch
    core: Any = executor.core
    core.list_namespaced_pod.return_value = client.V1PodList(items=[pod("p-1")])
    core.read_namespaced_pod_log.return_value = "epoch   1/20 ...\n"

    batch.list_namespaced_job.return_value = listed(
        cluster_job(built, active=1, ready=1, start_time=STARTED)
    )
    await executor.poll_once()
    assert (job.state, job.started_at) == ("running", STARTED)
    batch.list_namespaced_job.assert_called_with(
        "ml", label_selector="app.kubernetes.io/managed-by=kapi-trainer"
    )
    assert b"".join([chunk async for chunk in executor.log_chunks(job.id, False)]) == (
        b"epoch   1/20 ...\n"
    )
    core.list_namespaced_pod.assert_called_with(
        "ml", label_selector=f"job-name=kapi-train-{job.id}"
    )
    core.read_namespaced_pod_log.assert_called_with("p-1", "ml", container="kapi")

    (executor.store.folder(job.id) / "bundle").mkdir()  # what the pod wrote on the volume
    core.list_namespaced_pod.return_value = client.V1PodList(items=[pod("p-1", exit_code=0)])
    core.read_namespaced_pod_log.return_value = "epoch   1/20 ...\nbundle /x\n"
    done = client.V1JobCondition(type="Complete", status="True")
    batch.list_namespaced_job.return_value = listed(
        cluster_job(built, succeeded=1, conditions=[done], start_time=STARTED)
    )
    await executor.poll_once()
    assert (job.state, job.exit_code, job.reason) == ("succeeded", 0, None)
    assert job.result == str(executor.store.folder(job.id) / "bundle")
    assert executor.log_path(job.id).read_text() == "epoch   1/20 ...\nbundle /x\n"


async def test_a_failed_job_says_its_error_line_and_leaves_no_staging(
    executor: KubernetesExecutor,
) -> None:
    job = await executor.submit(train_spec(model="nope"))
    staging = executor.store.folder(job.id) / ".bundle-k2j4"
    staging.mkdir()
    batch: Any = executor.batch
    core: Any = executor.core
    core.list_namespaced_pod.side_effect = [
        client.V1PodList(items=[pod("p-1", exit_code=1, reason="Error")]),  # how it ended
        client.V1PodList(items=[]),  # gone: the staging may go
    ]
    core.read_namespaced_pod_log.return_value = "kapi train: error: unknown model 'nope'\n"
    failed = client.V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded")
    batch.list_namespaced_job.return_value = listed(
        cluster_job(build_job(job, executor.settings), failed=1, conditions=[failed])
    )
    await executor.poll_once()
    assert (job.state, job.exit_code) == ("failed", 1)
    assert job.reason == "kapi train: error: unknown model 'nope'"
    await cleanups_done(executor)
    assert not staging.exists()


async def test_an_out_of_memory_kill_is_the_reason(executor: KubernetesExecutor) -> None:
    job = await executor.submit(train_spec())
    core: Any = executor.core
    core.list_namespaced_pod.return_value = client.V1PodList(
        items=[pod("p-1", exit_code=137, reason="OOMKilled")]
    )
    core.read_namespaced_pod_log.return_value = "epoch   1/20 ...\n"
    failed = client.V1JobCondition(type="Failed", status="True")
    executor.batch.list_namespaced_job.return_value = listed(  # type: ignore[attr-defined]
        cluster_job(build_job(job, executor.settings), failed=1, conditions=[failed])
    )
    await executor.poll_once()
    assert (job.state, job.exit_code, job.reason) == ("failed", 137, "OOMKilled")


async def test_cancel_deletes_the_job_in_the_background(executor: KubernetesExecutor) -> None:
    job = await executor.submit(train_spec())
    staging = executor.store.folder(job.id) / ".bundle-a1b2"
    staging.mkdir()
    core: Any = executor.core
    core.list_namespaced_pod.side_effect = [
        client.V1PodList(items=[pod("p-1")]),  # still terminating
        client.V1PodList(items=[]),
    ]
    cancelled = await executor.cancel(job.id)
    executor.batch.delete_namespaced_job.assert_called_once_with(  # type: ignore[attr-defined]
        f"kapi-train-{job.id}", "ml", propagation_policy="Background"
    )
    assert cancelled.state == "cancelled"
    assert cancelled.cancel_requested_at is not None
    assert staging.exists()  # a pod could still write it
    await cleanups_done(executor)
    assert not staging.exists()
    assert core.list_namespaced_pod.call_count == 2


async def test_a_job_whose_kubernetes_job_is_gone_fails(executor: KubernetesExecutor) -> None:
    job = await executor.submit(train_spec())
    executor.batch.list_namespaced_job.return_value = listed()  # type: ignore[attr-defined]
    executor.core.list_namespaced_pod.return_value = client.V1PodList(items=[])  # type: ignore[attr-defined]
    await executor.poll_once()
    assert job.state == "failed"
    assert job.reason == f"its Kubernetes Job ml/kapi-train-{job.id} is gone"


async def cleanups_done(executor: KubernetesExecutor) -> None:
    """Wait for the executor's background clean-ups."""
    await asyncio.gather(*executor._cleanups)
