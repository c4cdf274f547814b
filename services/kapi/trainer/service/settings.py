"""A job service's settings: environment `KAPI_<SERVICE>_*`, overridden by flags. Every
service is the same service with its own name, its own kinds of job and its own defaults:
the trainer (`kapi trainer serve`) and the optimizer (`kapi optimizer serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from kapi.core.settings import ServiceSettings
from kapi.trainer.service.jobs import (
    BaseJob,
    HpoJob,
    IngestJob,
    Inputs,
    OptimizeJob,
    Quantity,
    TrainJob,
    VerifyJob,
)


class JobServiceSettings(ServiceSettings):
    """What every job service is configured with; a service is a subclass that names it,
    the kinds of job it runs, and its env prefix and defaults."""

    service: ClassVar[str]  # "trainer": the API's title, the log's and the Jobs' labels
    about: ClassVar[str]  # the API's description
    kinds: ClassVar[tuple[type[BaseJob], ...]]  # what it runs; it refuses any other kind

    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # The job records, logs and outputs (DATA/jobs/<id>), and the datasets by default.
    data: Path
    # The datasets' root that every job runs with (`--root`); default DATA/datasets.
    root: Path | None = None
    executor: Literal["local", "kubernetes"] = "local"
    # Local: how many jobs run at once (the others wait, queued).
    concurrency: Annotated[int, Field(ge=1)] = 1
    # Local: from SIGTERM to SIGKILL when a job is cancelled or the service stops.
    cancel_grace_s: Annotated[float, Field(gt=0)] = 10.0

    # Kubernetes: a job is a batch/v1 Job in `namespace` running `image`, with the volume
    # claim `pvc` mounted at DATA, the same path as in the service's own pod.
    namespace: str = "default"
    image: str
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    pvc: str | None = None
    service_account: str | None = None
    cpu_request: Quantity = "1"
    memory_request: Quantity = "2Gi"
    cpu_limit: Quantity | None = None
    memory_limit: Quantity | None = "8Gi"
    gpu_runtime_class: str | None = "nvidia"  # for jobs that ask for a GPU
    ttl_s: Annotated[int, Field(ge=0)] = 86_400  # ttlSecondsAfterFinished
    poll_s: Annotated[float, Field(gt=0)] = 5.0  # how often the Jobs' status is read

    @field_validator("data", "root")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return path.absolute() if path is not None else None  # jobs run in their own folder

    @property
    def datasets(self) -> Path:
        return self.root or self.data / "datasets"

    @property
    def jobs(self) -> Path:
        return self.data / "jobs"

    @property
    def inputs(self) -> Inputs:
        """What a job's spec may name: files in the datasets or in the jobs' folders."""
        return Inputs(base=self.data, folders=(self.datasets, self.jobs))

    @model_validator(mode="after")
    def _kubernetes_volume(self) -> Self:
        if self.executor != "kubernetes":
            return self
        if not self.pvc:
            raise ValueError("the kubernetes executor needs pvc: the claim jobs mount at data")
        if not self.datasets.is_relative_to(self.data):
            raise ValueError(f"root {self.datasets} must be under data {self.data}, the volume")
        return self


class TrainerServiceSettings(JobServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KAPI_TRAINER_", extra="forbid")

    service = "trainer"
    about = "Ingest datasets and train models as jobs: submit, status, logs, cancel."
    kinds = (TrainJob, HpoJob, IngestJob)

    data: Path = Path("/var/lib/kapi/trainer")
    image: str = "kapi-trainer:latest"


class OptimizerServiceSettings(JobServiceSettings):
    """Its DATA may be the trainer's (each service keeps to the records of its own kinds):
    then it optimizes the bundles the trainer's jobs wrote, on the datasets they used."""

    model_config = SettingsConfigDict(env_prefix="KAPI_OPTIMIZER_", extra="forbid")

    service = "optimizer"
    about = (
        "Optimize models into measured variants, and verify variants against requirements, "
        "as jobs: submit, status, logs, cancel."
    )
    kinds = (OptimizeJob, VerifyJob)

    data: Path = Path("/var/lib/kapi/optimizer")
    image: str = "kapi-optimizer:latest"
