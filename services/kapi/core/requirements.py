"""A model's requirements: the one spec that drives HPO, the optimizer, the verifier's gates
and the gateway's service levels. Unknown keys are errors, so a typo never passes silently."""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from kapi.core.errors import InvalidArgument
from kapi.core.hardware import is_known_profile

Fraction = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]


def _known_profile(name: str) -> str:
    if not is_known_profile(name):
        raise ValueError(f"unknown hardware profile {name!r}")
    return name


Profile = Annotated[str, AfterValidator(_known_profile)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Accuracy(_Spec):
    min: Fraction | None = None
    max_drop_vs_reference: Fraction | None = None
    min_top1_agreement: Fraction | None = None


class Target(_Spec):
    """The budgets on one hardware profile."""

    profile: Profile
    latency_p95_ms: Positive | None = None
    throughput_min_rps: Positive | None = None
    max_weights_kb: Positive | None = None
    max_memory_mb: Positive | None = None


class Robustness(_Spec):
    """Accuracy under perturbations of the test images, on a [0, 1] pixel scale: Gaussian
    noise of this standard deviation, brightness shifted by ± this much, the image shifted by
    this many pixels (each way, the worst counts). At least one is given."""

    gaussian_noise_std: Positive | None = None
    brightness_delta: Positive | None = None
    shift_pixels: Annotated[int, Field(gt=0)] | None = None
    min_accuracy: Fraction

    @model_validator(mode="after")
    def _some_perturbation(self) -> Robustness:
        if (self.gaussian_noise_std, self.brightness_delta, self.shift_pixels) == (None,) * 3:
            raise ValueError(
                "give at least one of gaussian_noise_std, brightness_delta, shift_pixels"
            )
        return self


class Formal(_Spec):
    """Certified robustness: for this fraction of the test inputs sampled, no L-infinity
    perturbation within each epsilon (on the [0, 1] pixel scale) changes the prediction."""

    epsilons: Annotated[list[Positive], Field(min_length=1)]
    min_certified_fraction: Fraction


class Serving(_Spec):
    p99_ms: Positive | None = None
    max_error_rate: Fraction | None = None


def _steps_reach_100(steps: list[int]) -> list[int]:
    if any(later <= earlier for earlier, later in pairwise(steps)):
        raise ValueError(f"steps must strictly increase, got {steps}")
    if steps[-1] != 100:
        raise ValueError(f"the last step must be 100, got {steps[-1]}")
    return steps


class Rollout(_Spec):
    steps_percent: Annotated[
        list[Annotated[int, Field(gt=0, le=100)]],
        Field(min_length=1),
        AfterValidator(_steps_reach_100),
    ]
    step_seconds: Positive


def _distinct_profiles(targets: list[Target]) -> list[Target]:
    profiles = [target.profile for target in targets]
    repeated = sorted({name for name in profiles if profiles.count(name) > 1})
    if repeated:
        raise ValueError(f"profile(s) listed more than once: {repeated}")
    return targets


class Requirements(_Spec):
    """The whole spec; every section but `model` and `task` may be left out."""

    model: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    task: Literal["classification", "detection", "segmentation", "regression", "other"]
    accuracy: Accuracy | None = None
    targets: Annotated[list[Target], AfterValidator(_distinct_profiles)] = []
    robustness: Robustness | None = None
    formal: Formal | None = None
    serving: Serving | None = None
    rollout: Rollout | None = None


def parse_requirements(data: Mapping[str, Any]) -> Requirements:
    """Validate a decoded spec; InvalidArgument lists every wrong field by its path."""
    try:
        return Requirements.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise InvalidArgument(f"invalid requirements: {problems}") from exc


def load_requirements(path: str | Path) -> Requirements:
    """Read a spec from a YAML file (JSON, a subset of YAML, reads too)."""
    path = Path(path)
    try:
        data = _decode(path.read_text(), json_only=path.suffix == ".json")
    except OSError as exc:
        raise InvalidArgument(f"requirements {path}: cannot read it: {exc}") from exc
    except ValueError as exc:  # json's and yaml's syntax errors both are ValueErrors or wrap one
        raise InvalidArgument(f"requirements {path}: not valid YAML or JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"requirements {path}: expected a mapping at the top level")
    return parse_requirements(data)


def _decode(text: str, *, json_only: bool) -> object:
    if json_only:
        return json.loads(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc
