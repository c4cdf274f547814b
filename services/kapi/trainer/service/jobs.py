"""What a job is: one `kapi` command of an allowed kind, its spec validated before it runs,
and the record the service keeps of it.

A kind is a pydantic model whose fields are the command's options. `argv` turns it into the
command line by one rule (`field_name` -> `--field-name=VALUE`, True -> `--field-name`,
None and False left out, `positional` fields last after `--`), then adds the options the
service alone decides (`--root`, `--out`). Adding a kind is a class and one line in
`JobSpec`: its `command`, its fields, and, when it writes something, where its result is
(`result`) and what a killed run of it may leave (`staging`); a service serves the kinds its
settings name (`kinds`), and its API takes and documents those alone (`spec_union`,
`record_model`).

Fields that name a file the job reads (`paths`) are taken relative to the service's DATA and
must lie in its datasets or jobs folders (`Inputs`): a job reads what the service keeps, not
any file of the machine (or the pod) it runs on.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# As the dataset store has it: a DNS label.
DatasetName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
# NAME or NAME@DIGEST, as `kapi optimize --dataset` and `kapi verify --dataset` take it.
DatasetRef = Annotated[
    str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(@(sha256:)?[0-9a-f]{1,64})?$")
]
# A file or folder the job reads (see `Inputs`).
WHERE = "relative to the service's data folder, or absolute; in its datasets or jobs folder"
ServicePath = Annotated[str, Field(min_length=1, max_length=4096, description=WHERE)]
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
class Inputs:
    """Where a job may read the files its spec names: a path relative to `base`, or an
    absolute one, that exists inside one of `folders` (after symlinks and '..')."""

    base: Path
    folders: tuple[Path, ...]

    def resolve(self, path: str) -> Path:
        """The path, absolute; ValueError saying why it is refused."""
        try:
            resolved = (self.base / path).resolve()  # an absolute `path` stays itself
            inside = any(_inside(resolved, folder.resolve()) for folder in self.folders)
            exists = inside and resolved.exists()
        except (OSError, RuntimeError) as exc:  # a symlink loop, a folder it may not read
            raise ValueError(f"{path}: cannot be resolved: {exc}") from exc
        if not inside:
            folders = " or ".join(str(folder) for folder in self.folders)
            raise ValueError(f"{path} is outside the service's folders ({folders})")
        if not exists:
            raise ValueError(f"{path}: no such file or folder ({resolved})")
        return resolved


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


class SpecRefused(ValueError):
    """A spec's paths that `Inputs` refused: (field, why) each."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {why}" for field, why in problems))
        self.problems = problems


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
    paths: ClassVar[tuple[str, ...]] = ()  # the fields that name a file the job reads

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

    def with_inputs(self, inputs: Inputs) -> Self:
        """This spec with each of its `paths` absolute; SpecRefused where one is not in
        `inputs`."""
        resolved: dict[str, str] = {}
        problems: list[tuple[str, str]] = []
        for name in self.paths:
            value = getattr(self, name)
            if value is None:
                continue
            try:
                resolved[name] = str(inputs.resolve(value))
            except ValueError as exc:
                problems.append((name, str(exc)))
        if problems:
            raise SpecRefused(problems)
        return self.model_copy(update=resolved) if resolved else self


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


# A requirements spec given inline (checked as `kapi.core.requirements` reads one), written
# into the job's folder for the command to read.
InlineRequirements = Annotated[dict[str, Any], AfterValidator(_requirements)]
REQUIREMENTS = "requirements.json"


def requirements_option(place: JobPlace) -> str:
    return f"--requirements={place.out / REQUIREMENTS}"


def requirements_file(document: dict[str, Any]) -> dict[str, str]:
    return {REQUIREMENTS: json.dumps(document, indent=2)}


def _known_profile(name: str) -> str:
    from kapi.core.hardware import is_known_profile

    if not is_known_profile(name):
        raise ValueError(f"unknown hardware profile {name!r}")
    return name


Profile = Annotated[str, AfterValidator(_known_profile)]


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
    requirements: InlineRequirements
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
        return [*super().service_options(place), requirements_option(place)]

    def files(self) -> dict[str, str]:
        return requirements_file(self.requirements)

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


# An optimization: a plugin, or a chain of them (prune-structured+ort-int8-static); the
# names themselves are kapi optimize's to check (its plugins import torch).
Optimization = Annotated[str, Field(pattern=r"^[a-z0-9-]{1,64}(\+[a-z0-9-]{1,64}){0,7}$")]
VARIANTS = "variants"


class OptimizeJob(BaseJob):
    """`kapi optimize`: a bundle's (or an ONNX model's) variants, each measured and, with
    requirements (inline, written beside the job), verified; in the job's folder."""

    command = ("optimize",)
    positional = ("source",)
    paths = ("source", "calibration_data")
    not_options = BaseJob.not_options | {"requirements"}

    kind: Literal["optimize"]
    source: ServicePath = Field(description=f"a kapi train bundle, or an ONNX model; {WHERE}")
    dataset: DatasetRef | None = None
    optimizations: Annotated[list[Optimization], Field(min_length=1)] | None = None
    calibration: Literal["minmax", "entropy", "percentile"] | None = None
    calibration_data: ServicePath | None = None
    prune_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    fine_tune_epochs: Annotated[int, Field(ge=0)] | None = None
    requirements: InlineRequirements | None = None
    targets: Annotated[list[Profile], Field(min_length=1)] | None = None
    runs: Positive | None = None

    def service_options(self, place: JobPlace) -> list[str]:
        options = [*super().service_options(place), f"--out={place.out / VARIANTS}"]
        return options + ([requirements_option(place)] if self.requirements else [])

    def files(self) -> dict[str, str]:
        return requirements_file(self.requirements) if self.requirements else {}

    def gpus(self) -> int:
        if self.resources.gpus is not None:
            return self.resources.gpus
        return 1 if any(target.startswith("nvidia-") for target in self.targets or []) else 0

    def staging(self, place: JobPlace) -> list[Staging]:
        # kapi.optimizer.variants builds the folder beside --out, then renames it into place
        return [Staging(place.out, f".{VARIANTS}-*")]

    def result(self, place: JobPlace, log: str) -> Path | None:
        variants = place.out / VARIANTS
        return variants if (variants / "variants.json").is_file() else None


class VerifyJob(BaseJob):
    """`kapi verify`: every check of the requirements (inline, written beside the job) on a
    variant; its report goes in the job's own folder."""

    command = ("verify",)
    positional = ("variant",)
    paths = ("variant", "reference")
    not_options = BaseJob.not_options | {"requirements"}

    kind: Literal["verify"]
    variant: ServicePath = Field(description=f"model.onnx, model.xml, or a folder; {WHERE}")
    requirements: InlineRequirements
    dataset: DatasetRef | None = None
    reference: ServicePath | None = None
    profile: Profile | None = None
    samples: Positive | None = None
    formal_samples: Positive | None = None
    runs: Positive | None = None

    def service_options(self, place: JobPlace) -> list[str]:
        options = [*super().service_options(place), requirements_option(place)]
        return [*options, f"--report-dir={place.out}"]

    def files(self) -> dict[str, str]:
        return requirements_file(self.requirements)

    def gpus(self) -> int:
        if self.resources.gpus is not None:
            return self.resources.gpus
        return 1 if (self.profile or "").startswith("nvidia-") else 0

    def result(self, place: JobPlace, log: str) -> Path | None:
        """The report the command wrote (kapi.verifier.report) in the job's folder."""
        report = place.out / "report.json"
        return report if report.is_file() else None


JobSpec = Annotated[
    TrainJob | HpoJob | IngestJob | OptimizeJob | VerifyJob, Field(discriminator="kind")
]


@functools.cache
def spec_union(kinds: tuple[type[BaseJob], ...]) -> Any:
    """The spec a service takes: one of `kinds`, chosen by its "kind"."""
    if len(kinds) == 1:
        return kinds[0]
    return Annotated[Union[kinds], Field(discriminator="kind")]  # noqa: UP007


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


@functools.cache
def record_model(kinds: tuple[type[BaseJob], ...]) -> type[JobRecord]:
    """JobRecord with its spec one of `kinds`: what a service answers, and documents."""
    return create_model(
        "JobRecord",
        __base__=JobRecord,
        __doc__=JobRecord.__doc__,
        spec=(spec_union(kinds), ...),
    )


def kind_names(kinds: Sequence[type[BaseJob]]) -> list[str]:
    """The kinds' names, as a spec's "kind" gives them."""
    return [get_args(kind.model_fields["kind"].annotation)[0] for kind in kinds]
