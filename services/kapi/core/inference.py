"""Transport-free inference request and response, shared by the node and the gateway.

A request's inputs stay encoded (as they came off the wire) until the model they are for
has been found and has checked their datatypes and shapes: a malformed or oversized payload
is refused before anything decodes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kapi.core.errors import InvalidArgument
from kapi.core.tensors import OBJECT_COST, Tensor, element_count, from_raw, from_values

Parameter = bool | int | float | str


@dataclass(slots=True)
class EncodedTensor:
    """A request input as it arrived: its header, and raw bytes or typed values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None  # a view into the request body, where it can be
    values: Sequence[object] = ()
    parameters: dict[str, Parameter] = field(default_factory=dict)

    @property
    def element_count(self) -> int:
        return element_count(self.shape)

    @property
    def decode_cost(self) -> int:
        """Roughly how many bytes of work decoding takes; raw numeric tensors are zero-copy."""
        if self.raw is None:
            return len(self.values) * OBJECT_COST
        return len(self.raw) if self.datatype == "BYTES" else 0

    def decode(self) -> Tensor:
        if self.raw is not None:
            return from_raw(self.name, self.datatype, self.shape, self.raw)
        return from_values(self.name, self.datatype, self.shape, self.values)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """How much of a request the model it is for can use: a request naming more inputs or
    outputs, or carrying more parameters in one map, is refused before its parts are
    converted one by one (millions of empty input headers fit in one message)."""

    inputs: int
    outputs: int
    parameters: int = 8  # more than kapi knows in any one map (six request parameters)


def check_counts(model: str, inputs: int, outputs: int, limits: RequestLimits) -> None:
    """Refuse a request naming far more inputs or outputs than its model has, unread."""
    if inputs > limits.inputs:
        raise InvalidArgument(
            f"model '{model}': {inputs} inputs in the request, more than {limits.inputs}, far "
            "more than the model takes"
        )
    if outputs > limits.outputs:
        raise InvalidArgument(
            f"model '{model}': {outputs} outputs requested, more than {limits.outputs}, far "
            "more than the model has; request each output once"
        )


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Parameter] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[EncodedTensor] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Parameter] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    shared_memory: set[str] = field(default_factory=set)  # outputs written there instead
