"""The trainer's job service, against real `kapi trainer serve` processes on loopback ports,
over real HTTP (httpx): jobs that ingest and train for real, logs followed as they are
written, cancels and kills in the middle of a run, and restarts of the service.

Most tests share one service (module scope) and the digits dataset its first job ingests;
the tests of queueing and of restarts start services of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.node import HOST, KAPI, free_port, terminate
from tests.support.registry import wait_healthy

JOB_TIMEOUT_S = 180.0  # a job on a busy 2-core machine: the interpreter and torch start slowly
FINISHED = ("succeeded", "failed", "cancelled")
TIMEOUT = httpx.Timeout(30.0, read=JOB_TIMEOUT_S)
# Long enough to be running still whenever a test looks: it is cancelled or killed.
LONG_TRAIN = {"epochs": 1000, "patience": 1000, "threads": 1}


@dataclass
class RunningService:
    process: subprocess.Popen[bytes]
    port: int
    data: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to stop its jobs."""
        self.process.kill()
        self.process.wait()


def start_service(data: Path, log_dir: Path, *args: str) -> RunningService:
    port = free_port()
    log_path = log_dir / f"trainer-{port}-{time.monotonic_ns()}.log"
    command = [str(KAPI), "trainer", "serve", "--host", HOST, "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--data", str(data), "--cancel-grace", "2", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = RunningService(process, port, data, log_path)
    wait_healthy("the service", service.url, process, service.log)
    return service


@contextlib.contextmanager
def running_service(data: Path, log_dir: Path, *args: str) -> Iterator[RunningService]:
    service = start_service(data, log_dir, *args)
    try:
        yield service
    finally:
        terminate(service.process)


# helpers


def submit(api: httpx.Client, **spec: Any) -> dict[str, Any]:
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def get(api: httpx.Client, job_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_until(api: httpx.Client, job_id: str, *states: str) -> dict[str, Any]:
    """The job once it is in one of `states` (default: ended); fails on another ending."""
    wanted = states or FINISHED
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = get(api, job_id)
        if job["state"] in wanted:
            return job
        assert job["state"] not in FINISHED, f"ended {job['state']}: {job}\n{logs(api, job_id)}"
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {wanted} in {JOB_TIMEOUT_S} s: {get(api, job_id)}")


def logs(api: httpx.Client, job_id: str) -> str:
    response = api.get(f"/v1/jobs/{job_id}/logs")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def pid_of(job: dict[str, Any]) -> int:
    """The job's process (its group's leader), from the handle the local executor gives."""
    kind, pid, _ = job["handle"].split()
    assert kind == "pid"
    return int(pid)


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_for_path(folder: Path, pattern: str, job_pid: int) -> Path:
    """The first match of `pattern` in `folder`, looked for while the job runs."""
    while is_running(job_pid):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.002)
    raise AssertionError(f"the job ended before {folder / pattern} appeared")


def staging_left(data: Path) -> list[Path]:
    return sorted(data.rglob(".bundle-*")) + sorted(data.rglob(".ingest-*"))


# the shared service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, node_logs: Path) -> Iterator[RunningService]:
    with running_service(tmp_path_factory.mktemp("trainer"), node_logs, "--concurrency", "2") as up:
        yield up


@pytest.fixture(scope="module")
def api(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def digits(api: httpx.Client) -> dict[str, Any]:
    """The job that ingested scikit-learn's digits as "digits", ended."""
    job = submit(api, kind="ingest", source="sklearn-digits", name="digits")
    return wait_until(api, job["id"])


def test_an_ingest_job_stores_a_dataset_version(
    digits: dict[str, Any], api: httpx.Client, service: RunningService
) -> None:
    assert digits["state"] == "succeeded", digits
    assert (digits["kind"], digits["exit_code"], digits["reason"]) == ("ingest", 0, None)
    root = service.data / "datasets"
    assert digits["command"] == [
        "kapi", "data", "ingest", "--name=digits", f"--root={root}", "--", "sklearn-digits",
    ]  # fmt: skip
    version = Path(digits["result"])
    assert version.parent == root / "digits"
    assert json.loads((version / "meta.json").read_text())["digest"].startswith(
        f"sha256:{version.name}"
    )
    assert digits["started_at"] <= digits["finished_at"]
    assert "digits sha256:" in logs(api, digits["id"])


def test_a_train_job_writes_its_bundle_in_its_folder(
    digits: dict[str, Any], api: httpx.Client, service: RunningService
) -> None:
    job = submit(api, kind="train", dataset="digits", model="small_cnn", epochs=2, threads=1)
    assert job["state"] in ("queued", "running")
    ended = wait_until(api, job["id"])
    assert ended["state"] == "succeeded", ended
    bundle = Path(ended["result"])
    assert bundle == service.data / "jobs" / job["id"] / "bundle"
    assert {"model.onnx", "metrics.json", "lineage.json"} <= {p.name for p in bundle.iterdir()}
    lineage = json.loads((bundle / "lineage.json").read_text())
    assert lineage["dataset"]["digest"].startswith(f"sha256:{Path(digits['result']).name}")
    text = logs(api, job["id"])
    assert "epoch   2/2" in text
    assert f"bundle {bundle}" in text


def test_an_hpo_job_writes_its_front_and_chosen_bundle(
    digits: dict[str, Any], api: httpx.Client, service: RunningService
) -> None:
    from kapi.core.hardware import detect_profiles

    here = next(p for p in detect_profiles() if p.startswith("cpu-"))
    requirements = {
        "model": "digits",
        "task": "classification",
        "targets": [{"profile": here, "latency_p95_ms": 50}],
    }
    job = submit(
        api, kind="hpo", dataset="digits", requirements=requirements, trials=2, epochs=1,
        models=["small_cnn"], widths=[0.25], threads=1,
    )  # fmt: skip
    ended = wait_until(api, job["id"])
    assert ended["state"] == "succeeded", (ended, logs(api, job["id"]))
    folder = service.data / "jobs" / job["id"]
    assert Path(ended["result"]) == folder / "bundle"
    assert json.loads((folder / "requirements.json").read_text()) == requirements
    assert len(json.loads((folder / "trials.json").read_text())) == 2
    lineage = json.loads((folder / "bundle" / "lineage.json").read_text())
    assert lineage["hpo"]["study"] == "hpo-digits"
    assert "Pareto front" in logs(api, job["id"])


def test_a_followed_log_streams_while_the_job_runs_and_ends_with_it(
    digits: dict[str, Any], api: httpx.Client, service: RunningService
) -> None:
    """The epoch lines come while the job runs; a cancel mid-training ends it (and the
    stream): no bundle, no staging."""
    job = submit(api, kind="train", dataset="digits", model="small_cnn", **LONG_TRAIN)
    seen: list[str] = []
    with api.stream("GET", f"/v1/jobs/{job['id']}/logs", params={"follow": "true"}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        for line in lines:
            seen.append(line)
            if sum(text.startswith("epoch ") for text in seen) == 2:
                break
        assert get(api, job["id"])["state"] == "running"
        assert seen[-1].startswith("epoch   2/1000")
        response = api.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["cancel_requested_at"] is not None
        rest = list(lines)  # until the job has ended: then the stream closes
    ended = get(api, job["id"])
    assert (ended["state"], ended["exit_code"]) == ("cancelled", -signal.SIGTERM)
    assert not any(line.startswith("best val accuracy") for line in rest)
    assert not (service.data / "jobs" / job["id"] / "bundle").exists()
    assert staging_left(service.data) == []
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_a_cancel_while_the_bundle_is_written_leaves_no_bundle(
    digits: dict[str, Any], api: httpx.Client, service: RunningService
) -> None:
    """Caught (frozen with SIGSTOP) with its bundle half-written, the job ignores SIGTERM
    and is killed after the grace period; its staging directory goes, and no bundle is there."""
    big = {"width": 8.0, "train_samples": 50, "batch_size": 50, "epochs": 1, "threads": 1}
    job = submit(api, kind="train", dataset="digits", model="small_cnn", **big)
    pid = pid_of(wait_until(api, job["id"], "running"))
    folder = service.data / "jobs" / job["id"]
    staging = wait_for_path(folder, ".bundle-*", pid)
    os.killpg(pid, signal.SIGSTOP)
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    ended = wait_until(api, job["id"])
    assert (ended["state"], ended["exit_code"]) == ("cancelled", -signal.SIGKILL)
    assert not staging.exists()
    assert not (folder / "bundle").exists()
    assert ended["result"] is None


def test_a_job_killed_while_it_stages_a_dataset_fails_and_leaves_nothing(
    api: httpx.Client, service: RunningService, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / "big.npz"  # 40 MB, so that its staging takes a while to write
    images = rng.integers(0, 256, (40_000, 32, 32, 1), dtype=np.uint8)
    np.savez(source, x=images, y=np.arange(len(images)) % 10)
    job = submit(api, kind="ingest", source=str(source), name="big")
    pid = pid_of(wait_until(api, job["id"], "running"))
    wait_for_path(service.data / "datasets" / "big", ".ingest-*", pid)
    os.killpg(pid, signal.SIGKILL)  # as the OOM killer would
    ended = wait_until(api, job["id"])
    assert (ended["state"], ended["exit_code"]) == ("failed", -signal.SIGKILL)
    assert ended["reason"] == "killed by SIGKILL"
    dataset = service.data / "datasets" / "big"
    assert [p.name for p in dataset.iterdir()] == [".lock"]  # no version, no staging
    assert staging_left(service.data) == []


def test_a_failing_job_says_its_error_line(digits: dict[str, Any], api: httpx.Client) -> None:
    job = submit(api, kind="train", dataset="digits", model="no_such_model", threads=1)
    ended = wait_until(api, job["id"])
    assert (ended["state"], ended["exit_code"], ended["result"]) == ("failed", 1, None)
    assert ended["reason"].startswith("kapi train: error: unknown model 'no_such_model'")
    assert ended["reason"] in logs(api, job["id"])


def test_an_unknown_job_is_404(api: httpx.Client) -> None:
    for response in (
        api.get("/v1/jobs/0123456789ab"),
        api.get("/v1/jobs/0123456789ab/logs", params={"follow": "true"}),
        api.post("/v1/jobs/0123456789ab/cancel"),
    ):
        assert response.status_code == 404
        assert response.json() == {"detail": "job '0123456789ab' is unknown"}


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"kind": "train", "dataset": "digits", "model": "small_cnn", "out": "/etc"}, "out"),
        ({"kind": "train", "dataset": "digits"}, "model"),
        ({"kind": "train", "dataset": "digits", "model": "small_cnn", "epochs": 0}, "epochs"),
        ({"kind": "train", "dataset": "Digits!", "model": "small_cnn"}, "dataset"),
        ({"kind": "ingest", "source": "sklearn-digits", "name": "d", "val": 1.5}, "val"),
        ({"kind": "shell", "command": "rm -rf /"}, "body"),
        ({"kind": "hpo", "dataset": "digits", "requirements": {"model": "d"}}, "requirements"),
        (
            {
                "kind": "hpo",
                "dataset": "digits",
                "storage": "postgresql://kapi:s3cret@db/optuna",
                "requirements": {"model": "d", "task": "classification"},
            },
            "storage",
        ),
        (
            {
                "kind": "hpo",
                "dataset": "digits",
                "model": "small_cnn",
                "requirements": {"model": "d", "task": "classification"},
            },
            "model",
        ),
        ({"dataset": "digits", "model": "small_cnn"}, "body"),
    ],
)
def test_a_bad_spec_is_422_and_runs_nothing(
    api: httpx.Client, spec: dict[str, Any], where: str
) -> None:
    before = len(api.get("/v1/jobs").json())
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert any(where in map(str, error["loc"]) for error in response.json()["detail"])
    assert len(api.get("/v1/jobs").json()) == before


def test_jobs_are_listed_oldest_first_and_filtered(
    digits: dict[str, Any], api: httpx.Client
) -> None:
    every = api.get("/v1/jobs").json()
    assert every[0]["id"] == digits["id"]
    assert [job["created_at"] for job in every] == sorted(job["created_at"] for job in every)
    succeeded = api.get("/v1/jobs", params={"state": "succeeded"}).json()
    assert digits["id"] in {job["id"] for job in succeeded}
    assert {job["state"] for job in succeeded} == {"succeeded"}
    ingests = api.get("/v1/jobs", params={"kind": "ingest"}).json()
    assert ingests
    assert {job["kind"] for job in ingests} == {"ingest"}
    assert api.get("/v1/jobs", params={"state": "done"}).status_code == 422


def test_the_api_is_documented(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/cancel",
    } <= set(schema["paths"])
    assert {"TrainJob", "IngestJob", "JobRecord"} <= set(schema["components"]["schemas"])
    assert api.get("/docs").status_code == 200


# queueing and restarts, on services of their own


def test_jobs_wait_their_turn_and_survive_restarts(tmp_path: Path, node_logs: Path) -> None:
    """Concurrency 1: a second job waits, queued, and a queued job cancels at once. A crash
    (SIGKILL) loses the running job: the next start kills its process and fails it. A stop
    (SIGTERM) fails the running job and keeps the queued one, which runs after the next start."""
    data = tmp_path / "trainer"
    service = start_service(data, node_logs)
    lost: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=service.url, timeout=TIMEOUT) as api:
            ingest = submit(api, kind="ingest", source="sklearn-digits", name="digits")
            ingest = wait_until(api, ingest["id"])
            assert ingest["state"] == "succeeded"
            lost = submit(api, kind="train", dataset="digits", model="small_cnn", **LONG_TRAIN)
            waiting = submit(api, kind="ingest", source="sklearn-digits", name="again")
            lost = wait_until(api, lost["id"], "running")
            assert get(api, waiting["id"])["state"] == "queued"
            cancelled = api.post(f"/v1/jobs/{waiting['id']}/cancel").json()
            assert (cancelled["state"], cancelled["started_at"]) == ("cancelled", None)
            assert "epoch " in wait_for_log(api, lost["id"], "epoch ")
        service.kill()
        assert is_running(pid_of(lost))  # its own process group: the crash did not take it

        service = start_service(data, node_logs)
        with httpx.Client(base_url=service.url, timeout=TIMEOUT) as api:
            after = {job["id"]: job for job in api.get("/v1/jobs").json()}
            assert list(after) == [ingest["id"], lost["id"], waiting["id"]]
            assert after[ingest["id"]] == ingest
            assert after[waiting["id"]]["state"] == "cancelled"
            assert after[lost["id"]]["state"] == "failed"
            assert after[lost["id"]]["reason"] == (
                "the service stopped while the job ran (found at its restart)"
            )
            assert not is_running(pid_of(lost))
            assert not (data / "jobs" / lost["id"] / "bundle").exists()

            running = submit(api, kind="train", dataset="digits", model="small_cnn", **LONG_TRAIN)
            queued = submit(api, kind="ingest", source="sklearn-digits", name="later")
            running = wait_until(api, running["id"], "running")
        terminate(service.process)
        assert "Application shutdown complete" in service.log()  # a stop, not a crash

        service = start_service(data, node_logs)
        with httpx.Client(base_url=service.url, timeout=TIMEOUT) as api:
            stopped = get(api, running["id"])
            assert (stopped["state"], stopped["reason"]) == (
                "failed",
                "the service stopped while the job ran",
            )
            assert not is_running(pid_of(running))
            assert wait_until(api, queued["id"])["state"] == "succeeded"
        assert staging_left(data) == []
    finally:
        terminate(service.process)
        if lost.get("handle") and is_running(pid_of(lost)):  # left by a failure above
            os.killpg(pid_of(lost), signal.SIGKILL)


def wait_for_log(api: httpx.Client, job_id: str, text: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if text in (found := logs(api, job_id)):
            return found
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log of {job_id}")
