"""Transport-free inference request and response, shared by the node and the gateway."""

from __future__ import annotations

from dataclasses import dataclass, field

from kapi.core.tensors import Tensor

Parameter = bool | int | float | str


@dataclass(slots=True)
class InferenceRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    requested_outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Parameter] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
