"""The optimizer's job service (`kapi optimizer serve`): the trainer's job service running the
optimizer's kinds. Real services on loopback ports over real HTTP (httpx), sharing one data
folder: the trainer's service ingests scikit-learn's digits and trains a small CNN; the
optimizer's optimizes that bundle, verifies a variant against an inline spec, cancels a run
in the middle, and refuses what it does not run or may not read. Then, with no cluster,
the Kubernetes Jobs of the new kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import kubernetes_validate
import pytest
from kapi.cli import _parser
from kapi.core.hardware import cpu_profiles
from kapi.trainer.service.jobs import BaseJob, JobPlace, JobRecord, OptimizeJob, VerifyJob
from kapi.trainer.service.kubernetes import KubernetesExecutor
from kapi.trainer.service.manifest import build_job
from kapi.trainer.service.settings import OptimizerServiceSettings
from kapi.trainer.service.store import JobStore
from kubernetes import client

from tests.integration.test_trainer_service import (
    TIMEOUT,
    RunningService,
    get,
    logs,
    pid_of,
    submit,
    wait_for_path,
    wait_until,
)
from tests.support.node import HOST, KAPI, free_port, terminate
from tests.support.registry import wait_healthy

PROFILE = cpu_profiles()[0]
SPEC: dict[str, Any] = {
    "model": "digits",
    "task": "classification",
    "accuracy": {"min": 0.5, "min_top1_agreement": 0.8},
    "targets": [{"profile": PROFILE, "latency_p95_ms": 1000.0, "max_weights_kb": 500}],
}
INT8 = "ort-int8-static"
# Long enough to be running still when the test cancels it: the fp32 model's measurement.
LONG_OPTIMIZE = {"optimizations": [INT8], "runs": 10_000_000}


def start_service(name: str, data: Path, log_dir: Path) -> RunningService:
    """`kapi NAME serve` on `data`, answering."""
    port = free_port()
    log_path = log_dir / f"{name}-{port}-{time.monotonic_ns()}.log"
    command = [str(KAPI), name, "serve", "--host", HOST, "--port", str(port), "--data", str(data)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--cancel-grace", "2"], stdout=log, stderr=subprocess.STDOUT
        )
    service = RunningService(process, port, data, log_path)
    wait_healthy(f"the {name} service", service.url, process, service.log)
    return service


@contextlib.contextmanager
def client_of(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=TIMEOUT) as api:
        yield api


# the services, on one data folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kapi")


@pytest.fixture(scope="module")
def trainer(data: Path, node_logs: Path) -> Iterator[httpx.Client]:
    service = start_service("trainer", data, node_logs)
    try:
        with client_of(service) as api:
            yield api
    finally:
        terminate(service.process)


@pytest.fixture(scope="module")
def service(data: Path, node_logs: Path) -> Iterator[RunningService]:
    up = start_service("optimizer", data, node_logs)
    try:
        yield up
    finally:
        terminate(up.process)


@pytest.fixture(scope="module")
def api(service: RunningService) -> Iterator[httpx.Client]:
    with client_of(service) as api:
        yield api


@pytest.fixture(scope="module")
def trained(trainer: httpx.Client) -> dict[str, Any]:
    """The trainer's job that trained small_cnn on digits, succeeded."""
    ingest = wait_until(
        trainer, submit(trainer, kind="ingest", source="sklearn-digits", name="digits")["id"]
    )
    assert ingest["state"] == "succeeded", ingest
    job = submit(trainer, kind="train", dataset="digits", model="small_cnn", epochs=4, threads=1)
    ended = wait_until(trainer, job["id"])
    assert ended["state"] == "succeeded", (ended, logs(trainer, job["id"]))
    return ended


@pytest.fixture(scope="module")
def optimized(
    trained: dict[str, Any], api: httpx.Client, service: RunningService
) -> tuple[dict[str, Any], str]:
    """The optimize job of the trained bundle, ended, and its log as followed."""
    source = f"jobs/{trained['id']}/bundle"
    job = submit(api, kind="optimize", source=source, optimizations=[INT8], runs=20)
    with api.stream("GET", f"/v1/jobs/{job['id']}/logs", params={"follow": "true"}) as stream:
        assert stream.status_code == 200
        followed = "".join(stream.iter_text())  # until the job has ended
    return get(api, job["id"]), followed


# optimize, verify, cancel


def test_an_optimize_job_writes_its_variants_in_its_folder(
    optimized: tuple[dict[str, Any], str],
    trained: dict[str, Any],
    api: httpx.Client,
    service: RunningService,
) -> None:
    job, followed = optimized
    assert (job["state"], job["kind"], job["exit_code"], job["reason"]) == (
        "succeeded", "optimize", 0, None,
    ), followed  # fmt: skip
    folder = service.data / "jobs" / job["id"]
    bundle = service.data / "jobs" / trained["id"] / "bundle"
    assert job["spec"]["source"] == str(bundle)  # given relative to the data folder
    assert job["command"] == [
        "kapi", "optimize", f"--optimizations={INT8}", "--runs=20",
        f"--root={service.data / 'datasets'}", f"--out={folder / 'variants'}", "--", str(bundle),
    ]  # fmt: skip
    variants = Path(job["result"])
    assert variants == folder / "variants"
    table = json.loads((variants / "variants.json").read_text())
    assert [row["name"] for row in table["variants"]] == ["fp32", INT8]
    assert (variants / INT8 / "model.onnx").is_file()
    assert table["source"] == str(bundle)
    assert INT8 in followed
    assert f"variants in {variants}" in followed
    assert followed == logs(api, job["id"])
    assert not list(folder.glob(".variants-*"))


def test_a_verify_job_reports_in_its_own_folder(
    optimized: tuple[dict[str, Any], str], api: httpx.Client, service: RunningService
) -> None:
    variants = Path(optimized[0]["result"])
    variant = f"jobs/{optimized[0]['id']}/variants/{INT8}/model.onnx"
    job = submit(api, kind="verify", variant=variant, requirements=SPEC, runs=20, samples=200)
    ended = wait_until(api, job["id"])
    assert ended["state"] == "succeeded", (ended, logs(api, job["id"]))
    folder = service.data / "jobs" / job["id"]
    assert ended["command"] == [
        "kapi", "verify", "--samples=200", "--runs=20", f"--root={service.data / 'datasets'}",
        f"--requirements={folder / 'requirements.json'}", f"--report-dir={folder}", "--",
        str(variants / INT8 / "model.onnx"),
    ]  # fmt: skip
    assert json.loads((folder / "requirements.json").read_text()) == SPEC
    report_path = Path(ended["result"])
    assert report_path == folder / "report.json"
    assert not (variants / INT8 / "report.json").exists()  # the optimize job's folder is kept
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert "PASSED" in logs(api, job["id"])


def test_a_verify_job_whose_variant_fails_the_spec_fails_with_its_report(
    optimized: tuple[dict[str, Any], str], api: httpx.Client, service: RunningService
) -> None:
    """`kapi verify` exits 1 when the variant does not pass: the job fails, naming what
    failed, its report written in its folder all the same."""
    fp32 = Path(optimized[0]["result"]) / "fp32"
    tight = {**SPEC, "targets": [{"profile": PROFILE, "max_weights_kb": 1}]}
    job = submit(api, kind="verify", variant=str(fp32), requirements=tight, runs=20, samples=50)
    ended = wait_until(api, job["id"])
    assert (ended["state"], ended["exit_code"], ended["result"]) == ("failed", 1, None)
    assert ended["reason"] == f"FAILED: targets[{PROFILE}].max_weights_kb"
    report = service.data / "jobs" / job["id"] / "report.json"
    assert json.loads(report.read_text())["passed"] is False


def test_a_cancelled_optimize_job_leaves_no_variants_and_no_staging(
    trained: dict[str, Any], api: httpx.Client, service: RunningService
) -> None:
    source = f"jobs/{trained['id']}/bundle"
    job = submit(api, kind="optimize", source=source, **LONG_OPTIMIZE)
    pid = pid_of(wait_until(api, job["id"], "running"))
    folder = service.data / "jobs" / job["id"]
    staging = wait_for_path(folder, ".variants-*", pid)
    response = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202, response.text
    ended = wait_until(api, job["id"])
    assert (ended["state"], ended["exit_code"]) == ("cancelled", -signal.SIGTERM)
    assert not staging.exists()
    assert not (folder / "variants").exists()
    assert ended["result"] is None
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


# what is refused


def optimize_of(**fields: Any) -> dict[str, Any]:
    """An optimize spec of the digits dataset's folder (there once `trained` is)."""
    return {"kind": "optimize", "source": "datasets/digits", **fields}


def verify_of(**fields: Any) -> dict[str, Any]:
    return {"kind": "verify", "variant": "datasets/digits", **fields}


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"kind": "train", "dataset": "digits", "model": "small_cnn"}, "body"),
        ({"kind": "ingest", "source": "sklearn-digits", "name": "d"}, "body"),
        ({"source": "datasets/digits"}, "body"),
        (optimize_of(out="/etc"), "out"),
        (optimize_of(calibration="x"), "calibration"),
        (optimize_of(targets=["gpu-x"]), "targets"),
        (optimize_of(prune_ratio=1.5), "prune_ratio"),
        (optimize_of(optimizations=["a b"]), "optimizations"),
        (optimize_of(requirements={"model": "d"}), "requirements"),
        (optimize_of(source="/etc/passwd"), "source"),
        (optimize_of(source="jobs/../../../etc/passwd"), "source"),
        (optimize_of(source="jobs/0123456789ab/bundle"), "source"),
        (optimize_of(calibration_data="/tmp"), "calibration_data"),
        (verify_of(), "requirements"),
        (verify_of(requirements={**SPEC, "formal": {}}), "requirements"),
        (verify_of(variant="/", requirements=SPEC), "variant"),
    ],
)
def test_a_bad_spec_is_422_and_runs_nothing(
    trained: dict[str, Any], api: httpx.Client, service: RunningService,
    spec: dict[str, Any], where: str,
) -> None:  # fmt: skip
    before = api.get("/v1/jobs").json()
    folders = sorted((service.data / "jobs").iterdir())
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert any(where in map(str, error["loc"]) for error in response.json()["detail"])
    assert api.get("/v1/jobs").json() == before
    assert sorted((service.data / "jobs").iterdir()) == folders


def test_a_kind_the_service_does_not_run_is_named(api: httpx.Client) -> None:
    response = api.post("/v1/jobs", json={"kind": "train", "dataset": "d", "model": "m"})
    (error,) = response.json()["detail"]
    assert "'train'" in error["msg"]
    assert "'optimize', 'verify'" in error["msg"]


def test_a_path_outside_the_data_folder_is_named(
    api: httpx.Client, service: RunningService
) -> None:
    response = api.post("/v1/jobs", json={"kind": "optimize", "source": "/etc/passwd"})
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "optimize", "source"]
    assert error["msg"] == (
        f"Value error, /etc/passwd is outside the service's folders ({service.data / 'datasets'} "
        f"or {service.data / 'jobs'})"
    )


def test_each_service_keeps_to_its_own_kinds(
    trained: dict[str, Any], optimized: tuple[dict[str, Any], str], api: httpx.Client,
    trainer: httpx.Client,
) -> None:  # fmt: skip
    """One data folder, two services: each lists, answers for and takes its own jobs."""
    assert {job["kind"] for job in api.get("/v1/jobs").json()} <= {"optimize", "verify"}
    assert {job["kind"] for job in trainer.get("/v1/jobs").json()} <= {"ingest", "train"}
    assert api.get(f"/v1/jobs/{trained['id']}").status_code == 404
    assert trainer.get(f"/v1/jobs/{optimized[0]['id']}").status_code == 404
    source = f"jobs/{trained['id']}/bundle"
    response = trainer.post("/v1/jobs", json={"kind": "optimize", "source": source})
    assert response.status_code == 422, response.text


def test_the_api_is_documented(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    assert schema["info"]["title"] == "kapi optimizer jobs"
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/cancel",
    } <= set(schema["paths"])
    schemas = set(schema["components"]["schemas"])
    assert {"OptimizeJob", "VerifyJob", "JobRecord"} <= schemas
    assert not {"TrainJob", "HpoJob", "IngestJob"} & schemas
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert set(body["schema"]["discriminator"]["mapping"]) == {"optimize", "verify"}
    assert api.get("/docs").status_code == 200


# the Kubernetes Jobs of the optimizer's kinds, with no cluster

KUBERNETES_VERSION = "1.33"
STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def settings(tmp_path: Path, **overrides: Any) -> OptimizerServiceSettings:
    fields: dict[str, Any] = {
        "data": tmp_path / "data",
        "executor": "kubernetes",
        "namespace": "ml",
        "image": "registry.local/kapi-optimizer:1.2",
        "pvc": "kapi-data",
        **overrides,
    }
    return OptimizerServiceSettings(**fields)


def record(spec: BaseJob, config: OptimizerServiceSettings, job_id: str) -> JobRecord:
    """A record as the executor makes it on submit."""
    place = JobPlace(root=config.datasets, out=config.jobs / job_id)
    return JobRecord.model_validate(
        {
            "id": job_id,
            "kind": spec.kind,
            "spec": spec.model_dump(),
            "executor": "kubernetes",
            "command": ["kapi", *spec.argv(place)],
            "created_at": STARTED,
        }
    )


def optimize_spec(**fields: Any) -> OptimizeJob:
    return OptimizeJob(**{"kind": "optimize", "source": "/srv/kapi/jobs/a1/bundle", **fields})


def verify_spec(**fields: Any) -> VerifyJob:
    variant = "/srv/kapi/jobs/b2/variants/ort-int8-static"
    return VerifyJob(**{"kind": "verify", "variant": variant, "requirements": SPEC, **fields})


def test_the_args_are_what_the_kapi_command_parses() -> None:
    config = OptimizerServiceSettings(data=Path("/srv/kapi"))
    spec = optimize_spec(
        optimizations=["prune-structured+ort-int8-static", "fp16"], calibration="entropy",
        prune_ratio=0.25, fine_tune_epochs=0, targets=[PROFILE, "nvidia-sm90"], runs=7,
        requirements=SPEC, dataset="digits@sha256:0a1b",
    )  # fmt: skip
    parsed = _parser().parse_args(record(spec, config, "c3").command[1:])
    assert (parsed.command, parsed.source) == ("optimize", Path("/srv/kapi/jobs/a1/bundle"))
    assert parsed.optimizations == "prune-structured+ort-int8-static,fp16"
    assert (parsed.calibration, parsed.prune_ratio, parsed.fine_tune_epochs) == ("entropy", 0.25, 0)
    assert (parsed.targets, parsed.runs) == (f"{PROFILE},nvidia-sm90", 7)
    assert parsed.dataset == "digits@sha256:0a1b"
    assert parsed.root == Path("/srv/kapi/datasets")
    assert parsed.out == Path("/srv/kapi/jobs/c3/variants")
    assert parsed.requirements == Path("/srv/kapi/jobs/c3/requirements.json")
    assert spec.files() == {"requirements.json": json.dumps(SPEC, indent=2)}
    assert optimize_spec().files() == {}
    assert "--requirements" not in " ".join(record(optimize_spec(), config, "c4").command)

    verify = verify_spec(profile=PROFILE, samples=100, formal_samples=5, runs=9, dataset="d")
    parsed = _parser().parse_args(record(verify, config, "d4").command[1:])
    assert (parsed.command, parsed.variant, parsed.dataset) == ("verify", Path(verify.variant), "d")
    assert (parsed.profile, parsed.samples, parsed.formal_samples, parsed.runs) == (
        PROFILE, 100, 5, 9,
    )  # fmt: skip
    assert parsed.requirements == Path("/srv/kapi/jobs/d4/requirements.json")
    assert parsed.root == Path("/srv/kapi/datasets")


def test_an_optimize_job_is_a_batch_v1_job_of_the_optimizer(tmp_path: Path) -> None:
    config = settings(tmp_path)
    built = build_job(record(optimize_spec(runs=5), config, "0123456789ab"), config)
    assert built.metadata is not None
    assert built.metadata.name == "kapi-optimize-0123456789ab"
    assert built.metadata.labels is not None
    assert built.metadata.labels["app.kubernetes.io/managed-by"] == "kapi-optimizer"
    assert built.metadata.labels["app.kubernetes.io/component"] == "optimizer-job"
    assert built.metadata.labels["kapi.dev/job-kind"] == "optimize"
    assert built.spec is not None
    pod = built.spec.template.spec
    assert pod is not None
    (kapi,) = pod.containers
    assert kapi.image == "registry.local/kapi-optimizer:1.2"
    data = tmp_path / "data"
    assert kapi.args == [
        "optimize", "--runs=5", f"--root={data / 'datasets'}",
        f"--out={data / 'jobs' / '0123456789ab' / 'variants'}", "--", "/srv/kapi/jobs/a1/bundle",
    ]  # fmt: skip
    assert kapi.working_dir == str(data / "jobs" / "0123456789ab")
    assert pod.runtime_class_name is None
    assert kapi.resources is not None
    assert kapi.resources.limits == {"memory": "8Gi"}


def test_jobs_for_nvidia_profiles_get_a_gpu(tmp_path: Path) -> None:
    config = settings(tmp_path)
    for spec in (optimize_spec(targets=["nvidia-sm90"]), verify_spec(profile="nvidia-sm90")):
        built = build_job(record(spec, config, "e5"), config)
        assert built.spec is not None
        pod = built.spec.template.spec
        assert pod is not None
        assert pod.runtime_class_name == "nvidia"
        assert pod.containers[0].resources is not None
        assert pod.containers[0].resources.limits == {"memory": "8Gi", "nvidia.com/gpu": "1"}
    assert optimize_spec(targets=["nvidia-sm90"], resources={"gpus": 0}).gpus() == 0


def test_the_manifests_validate_against_the_kubernetes_schema(tmp_path: Path) -> None:
    config = settings(tmp_path, service_account="optimizer")
    for spec in (optimize_spec(targets=["nvidia-sm90"], requirements=SPEC), verify_spec()):
        manifest = client.ApiClient().sanitize_for_serialization(
            build_job(record(spec, config, "f6"), config)
        )
        assert manifest["spec"]["template"]["spec"]["serviceAccountName"] == "optimizer"
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


async def test_the_kubernetes_executor_follows_the_optimizers_jobs(tmp_path: Path) -> None:
    config = settings(tmp_path, poll_s=0.01)
    store = JobStore(config.jobs)
    batch = mock.create_autospec(client.BatchV1Api, instance=True)
    core = mock.create_autospec(client.CoreV1Api, instance=True)
    bundle = config.jobs / "a1" / "bundle"
    bundle.mkdir(parents=True)
    try:
        executor = KubernetesExecutor(config, store, batch, core)
        job = await executor.submit(optimize_spec(source="jobs/a1/bundle"))
        (call,) = batch.create_namespaced_job.call_args_list
        assert call.args[1] == build_job(job, config)
        assert job.command[-2:] == ["--", str(bundle)]
        batch.list_namespaced_job.return_value = client.V1JobList(items=[])
        core.list_namespaced_pod.return_value = client.V1PodList(items=[])
        await executor.poll_once()
        batch.list_namespaced_job.assert_called_with(
            "ml", label_selector="app.kubernetes.io/managed-by=kapi-optimizer"
        )
        assert job.state == "failed"
        await asyncio.gather(*executor._cleanups)
    finally:
        store.close()
