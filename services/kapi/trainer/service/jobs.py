"""What a job is: one `kapi` command of an allowed kind, its spec validated before it runs,
and the record the service keeps of it.

A kind is a pydantic model whose fields are the command's options. `argv` turns it into the
command line by one rule (`field_name` -> `--field-name=VALUE`, True -> `--field-name`,
None and False left out, `positional` fields last after `--`), then adds the options the
service alone decides (`--root`, `--out`). Adding a kind is a class and one line in
`JobSpec`: its `command`, its fields, and, when it writes something, where its result is
(`result`) and what a killed run of it may leave (`staging`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# As the dataset store has it: a DNS label.
DatasetName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
Positive = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(ge=0.0, lt=1.0)]
# A Kubernetes quantity: "500m", "2", "4Gi", "1.5e3".
Quantity = Annotated[
    str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][0-9]+)?$")
]


@dataclass(frozen=True)
class JobPlace:
    """Where a job works: the datasets' root and its own output directory."""

    root: Path
    out: Path


@dataclass(frozen=True)
class Staging:
    """Directories or files named `pattern` in `folder` that a killed run may leave behind;
    removed while holding `lock` (a flock) when the writer holds it while it stages."""

    folder: Path
    pattern: str
    lock: Path | None = None


class Resources(BaseModel):
    """What the job asks of a Kubernetes node (requests = limits); the local executor runs
    every job on its own machine and ignores them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: Quantity | None = None
    memory: Quantity | None = None
    gpus: Annotated[int, Field(ge=0)] | None = None


class BaseJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: ClassVar[tuple[str, ...]]  # the kapi subcommand, e.g. ("data", "ingest")
    positional: ClassVar[tuple[str, ...]] = ()
    not_options: ClassVar[frozenset[str]] = frozenset({"kind", "resources"})

    kind: str  # each kind's Literal: what a spec's "kind" chooses
    resources: Resources = Resources()

    def argv(self, place: JobPlace) -> list[str]:
        """The arguments of `kapi`, e.g. ["train", "--dataset=digits", ..., "--root=/data"]."""
        options: list[str] = []
        for name, value in self:
            if name not in self.not_options and name not in self.positional:
                options += _option(name, value)
        positionals = [str(getattr(self, name)) for name in self.positional]
        return [
            *self.command,
            *options,
            *self.service_options(place),
            *(["--", *positionals] if positionals else []),
        ]

    def service_options(self, place: JobPlace) -> list[str]:
        return [f"--root={place.root}"]

    def gpus(self) -> int:
        return self.resources.gpus or 0

    def staging(self, place: JobPlace) -> list[Staging]:
        return []

    def result(self, place: JobPlace, log: str) -> Path | None:
        """Where a successful run left its result (None: it left none)."""
        return None

    def files(self) -> dict[str, str]:
        """Files the command reads, written into the job's folder before it runs."""
        return {}


def _option(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))  # the CLI's lists: --models=a,b
    return [f"{flag}={value}"]  # one word: a value that starts with '-' stays a value


class TrainOptions(BaseJob):
    """The options of `kapi train` that one run and a search (the "hpo" kind) share."""

    command: ClassVar[tuple[str, ...]] = ("train",)

    dataset: DatasetName
    version: Annotated[str, Field(pattern=r"^(sha256:)?[0-9a-f]{1,64}$")] | None = None
    epochs: Positive | None = None
    seed: Annotated[int, Field(ge=0, lt=2**31)] | None = None
    train_samples: Positive | None = None
    threads: Positive | None = None

    def service_options(self, place: JobPlace) -> list[str]:
        return [*super().service_options(place), f"--out={place.out}", "--no-progress"]

    def staging(self, place: JobPlace) -> list[Staging]:
        return [Staging(place.out, ".bundle-*")]  # kapi.trainer.bundle's staging directory

    def result(self, place: JobPlace, log: str) -> Path | None:
        bundle = place.out / "bundle"
        return bundle if bundle.is_dir() else None


class OneRunOptions(TrainOptions):
    """What one run fixes and a study searches (or fixes itself)."""

    batch_size: Positive | None = None
    lr: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    weight_decay: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    width: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    depth: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    patience: Positive | None = None
    device: Annotated[str, Field(pattern=r"^[a-z]+(:[0-9]+)?$")] | None = None

    def gpus(self) -> int:
        if self.resources.gpus is not None:
            return self.resources.gpus
        return 1 if (self.device or "").startswith("cuda") else 0


class TrainJob(OneRunOptions):
    """`kapi train`: one model, its bundle in the job's folder."""

    kind: Literal["train"]
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _requirements(document: dict[str, Any]) -> dict[str, Any]:
    from kapi.core.errors import InvalidArgument
    from kapi.core.requirements import parse_requirements

    try:
        parse_requirements(document)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from exc
    return document


def _no_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.password or any("password" in key.lower() for key in parsed.query):
        raise ValueError("a storage URL with a password; give it as PGPASSWORD instead")
    return url


Grid = Annotated[list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]], Field(min_length=1)]


class HpoJob(TrainOptions):
    """`kapi train --hpo`: a study, its front and its chosen bundle in the job's folder. The
    requirements spec comes inline, as a document, and is written beside the job."""

    command = ("train", "--hpo")
    not_options = BaseJob.not_options | {"requirements"}

    kind: Literal["hpo"]
    requirements: Annotated[dict[str, Any], AfterValidator(_requirements)]
    trials: Positive | None = None
    study: DatasetName | None = None
    # No password: the URL is kept in the job record and the command line (a Kubernetes Job's
    # args); the database's password comes from the worker's environment (PGPASSWORD).
    storage: (
        Annotated[str, Field(pattern=r"^postgresql(\+psycopg)?://"), AfterValidator(_no_password)]
        | None
    ) = None
    profile: Annotated[str, Field(pattern=r"^[a-z0-9-]+$")] | None = None
    runtime: Literal["onnxruntime", "openvino"] | None = None
    models: (
        Annotated[list[Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]], Field(min_length=1)] | None
    ) = None
    widths: Grid | None = None
    depths: Grid | None = None
    batch_sizes: Annotated[list[Positive], Field(min_length=1)] | None = None
    objectives: (
        Annotated[
            list[Literal["accuracy", "latency", "weights", "memory", "energy"]], Field(min_length=1)
        ]
        | None
    ) = None
    sampler: Literal["nsga2", "tpe"] | None = None
    population: Positive | None = None
    workers: Positive | None = None
    no_prune: bool = False
    choose: Literal["most-accurate", "fastest", "smallest"] | None = None

    def service_options(self, place: JobPlace) -> list[str]:
        spec = place.out / "requirements.json"
        return [*super().service_options(place), f"--requirements={spec}"]

    def files(self) -> dict[str, str]:
        return {"requirements.json": json.dumps(self.requirements, indent=2)}

    def staging(self, place: JobPlace) -> list[Staging]:
        # the chosen bundle's swap (kapi.trainer.hpo.report), and each trial's bundle
        return [Staging(place.out, ".bundle-*"), Staging(place.out, "trials/*/.bundle-*")]


class IngestJob(BaseJob):
    """`kapi data ingest`: a version of a dataset under the service's root."""

    command = ("data", "ingest")
    positional = ("source",)

    kind: Literal["ingest"]
    source: Annotated[str, Field(min_length=1, max_length=4096)]
    name: DatasetName
    seed: Annotated[int, Field(ge=0, lt=2**31)] | None = None
    val: Share | None = None
    test: Share | None = None
    resize: Annotated[str, Field(pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")] | None = None
    channels: Literal["grayscale", "rgb"] | None = None

    def staging(self, place: JobPlace) -> list[Staging]:
        folder = place.root / self.name
        lock = folder / ".lock"  # kapi.trainer.data.store holds it while it stages
        return [Staging(folder, ".ingest-*", lock), Staging(folder, ".versions.json-*", lock)]

    def result(self, place: JobPlace, log: str) -> Path | None:
        """The version directory, found by the digest the command printed."""
        printed = re.search(rf"^{re.escape(self.name)} sha256:([0-9a-f]{{8,}})", log, re.M)
        folder = place.root / self.name
        if printed is None or not folder.is_dir():
            return None
        found = sorted(folder.glob(f"{printed.group(1)[:16]}*"))
        return found[0] if len(found) == 1 else None


JobSpec = Annotated[TrainJob | HpoJob | IngestJob, Field(discriminator="kind")]


class JobRecord(BaseModel):
    """What the service knows of a job; the API's answer and what it keeps on disk."""

    id: str
    kind: str
    spec: JobSpec
    state: JobState = "queued"
    executor: str
    command: list[str] = Field(description="the kapi command line the job runs")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    exit_code: int | None = Field(
        default=None,
        description="the command's exit status; -N: killed by signal N (local executor)",
    )
    reason: str | None = Field(default=None, description="why it failed or was cancelled")
    result: str | None = Field(default=None, description="where its result is: a bundle, a version")
    handle: str | None = Field(
        default=None,
        description="where it runs: 'pid PID START' locally, NAMESPACE/NAME on Kubernetes",
    )

    @property
    def finished(self) -> bool:
        return self.state in FINISHED
