"""What an HPO study is asked: its search space, objectives and settings, checked before
any trial runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kapi.core.errors import InvalidArgument
from kapi.core.hardware import is_known_profile
from kapi.core.requirements import Requirements
from kapi.trainer import models

OBJECTIVES: dict[str, tuple[Literal["maximize", "minimize"], str]] = {  # (direction, unit)
    "accuracy": ("maximize", ""),
    "latency": ("minimize", "ms"),
    "weights": ("minimize", "KB"),
    "memory": ("minimize", "MB"),
    "energy": ("minimize", "mJ"),
}
PositiveInt = Annotated[int, Field(ge=1)]
Multiplier = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class HpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    dataset_version: str | None = None
    study: str
    storage: str | None = None  # an Optuna storage URL; None: sqlite in the output folder
    trials: PositiveInt = 20
    requirements: Requirements
    profile: str | None = None  # the objectives' target; None: the spec's first target
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    models: Annotated[list[str], Field(min_length=1)] = [
        "small_cnn",
        "mobilenet_v2",
        "efficientnet_b0",
        "resnet18",
    ]
    widths: Annotated[list[Multiplier], Field(min_length=1)] = [0.25, 0.5, 0.75, 1.0]
    depths: Annotated[list[Multiplier], Field(min_length=1)] = [0.5, 1.0]
    batch_sizes: Annotated[list[PositiveInt], Field(min_length=1)] = [64, 128, 256]
    lr_range: tuple[float, float] = (3e-4, 1e-2)
    epochs: PositiveInt = 3  # per trial
    train_samples: PositiveInt | None = 5000  # per trial; None: the whole training split
    objectives: list[str] | None = None  # None: accuracy, latency and what the spec budgets
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    population: Annotated[int, Field(ge=2)] = 8  # NSGA-II's generation size
    seed: int = 0
    workers: PositiveInt = 1
    threads: PositiveInt | None = None  # torch threads per worker; None: cores / workers
    measure_threads: PositiveInt = 1
    measure_runs: PositiveInt = 500
    prune: bool = True
    prune_startup_trials: int = 4  # trained trials before the median rule applies
    prune_warmup_epochs: int = 1  # epochs a trial trains before the rule applies to it
    choose: Literal["most-accurate", "fastest", "smallest"] = "most-accurate"

    @model_validator(mode="after")
    def _check(self) -> HpoConfig:
        unknown = sorted(set(self.models) - set(models.names()))
        if unknown:
            raise ValueError(f"unknown architecture(s) {unknown}; the zoo has {models.names()}")
        if not self.requirements.targets and self.profile is None:
            raise ValueError("the requirements name no target: give one, or a profile")
        wrong = sorted(set(self.objectives or []) - set(OBJECTIVES))
        if wrong:
            raise ValueError(f"unknown objective(s) {wrong}; choose from {list(OBJECTIVES)}")
        if self.objectives is not None and self.objectives[:1] != ["accuracy"]:
            raise ValueError("the first objective must be accuracy")
        if self.objectives is not None and len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives repeat: {self.objectives}")
        if self.profile is not None and not is_known_profile(self.profile):
            raise ValueError(f"unknown hardware profile {self.profile!r}")
        low, high = self.lr_range
        if not 0 < low <= high:
            raise ValueError(f"lr_range {self.lr_range}: expected 0 < low <= high")
        return self

    def primary_profile(self) -> str:
        return self.profile or self.requirements.targets[0].profile

    def objective_names(self) -> list[str]:
        if self.objectives is not None:
            return list(self.objectives)
        names = ["accuracy", "latency"]
        primary = self._primary_target()
        if primary is not None and primary.max_weights_kb is not None:
            names.append("weights")
        if primary is not None and primary.max_memory_mb is not None:
            names.append("memory")
        return names

    def _primary_target(self) -> Any:
        return next(
            (t for t in self.requirements.targets if t.profile == self.primary_profile()), None
        )


def load_config(**fields: Any) -> HpoConfig:
    """An HpoConfig, its validation errors as one InvalidArgument."""
    from pydantic import ValidationError

    try:
        return HpoConfig(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'hpo'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArgument(f"invalid HPO settings: {problems}") from exc
