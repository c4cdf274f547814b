"""Request, input and output parameters: what kapi honours and what it refuses.

Triton gives some parameter names a meaning (priority, timeout, sequences, classification,
shared memory). kapi honours priorities, timeouts, classification and shared memory; it
answers each one it does not implement with UNIMPLEMENTED, naming it, rather than
accepting it and giving a different answer than Triton would. A parameter at its default
value asks for nothing, so it is honoured. Any other name is INVALID_ARGUMENT:
kapi's runtimes take no custom parameters, and a typo must not pass unseen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kapi.core.errors import InvalidArgument, Unimplemented
from kapi.core.inference import EncodedTensor, InferenceRequest, Parameter, RequestedOutput

# Honoured: the priority level, queue timeout (microseconds) and sequence a request asks for.
_SCHEDULING = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")


@dataclass(frozen=True, slots=True)
class Scheduling:
    """How a request asks to be scheduled (Triton's request parameters)."""

    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0  # 0: none
    sequence_start: bool = False
    sequence_end: bool = False


# name -> (the type Triton requires, its default, what it asks for)
_REQUEST: dict[str, tuple[type | tuple[type, ...], Parameter, str]] = {
    "priority": (int, 0, ""),
    "timeout": (int, 0, ""),
    "sequence_id": ((int, str), 0, "sequence batching"),
    "sequence_start": (bool, False, "sequence batching"),
    "sequence_end": (bool, False, "sequence batching"),
    "triton_enable_empty_final_response": (bool, False, "decoupled models"),
}


_DEFAULT = Scheduling()


def check_request_parameters(request: InferenceRequest) -> Scheduling:
    """How the request is to be scheduled, its other parameters checked."""
    if not request.parameters:
        return _DEFAULT
    for name, value in request.parameters.items():
        rule = _REQUEST.get(name)
        if rule is None:
            raise _unknown(f"model '{request.model_name}': request parameter '{name}'")
        kind, default, feature = rule
        # bool is an int in Python; a flag is not a number, nor a number a flag.
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise InvalidArgument(
                f"request parameter '{name}' is {type(value).__name__} {value!r}; "
                f"Triton takes it as {_type_name(kind)}"
            )
        if kind is int and isinstance(value, int) and value < 0:  # Triton's words
            raise InvalidArgument(f"invalid value for '{name}', expected value >= 0")
        if value not in (default, "") and name not in _SCHEDULING:
            raise Unimplemented(
                f"request parameter '{name}' ({value!r}) asks for {feature}, which kapi does "
                "not support yet"
            )
    given = request.parameters
    return Scheduling(
        priority=int(given.get("priority", 0)),
        timeout_us=int(given.get("timeout", 0)),
        sequence_id=given.get("sequence_id", 0),  # type: ignore[arg-type]  # checked above
        sequence_start=bool(given.get("sequence_start", False)),
        sequence_end=bool(given.get("sequence_end", False)),
    )


def check_input_parameters(model: str, tensor: EncodedTensor) -> None:
    _check_tensor(f"model '{model}': input '{tensor.name}'", tensor.parameters)


def check_output_parameters(model: str, output: RequestedOutput) -> int:
    """The output's `classification` count (0: none asked); any other parameter is refused."""
    parameters = dict(output.parameters)
    count = parameters.pop("classification", 0)
    # Triton's words, for its types: an int64 (a bool is no count), more than 0.
    if not isinstance(count, int) or isinstance(count, bool):
        raise InvalidArgument(
            "invalid value type for 'classification' parameter, expected int64_param"
        )
    if "classification" in output.parameters and count <= 0:
        raise InvalidArgument("invalid value for 'classification' parameter, expected >= 0")
    _check_tensor(f"model '{model}': requested output '{output.name}'", parameters)
    return count


def _check_tensor(where: str, parameters: Mapping[str, Parameter]) -> None:
    """No tensor parameter is left to check: shared memory's are taken off by the data
    plane, classification by the caller; any other is unknown."""
    for name in parameters:
        raise _unknown(f"{where}: parameter '{name}'")


@dataclass(frozen=True, slots=True)
class LoadOverride:
    """What RepositoryModelLoad asks to load instead of the repository's files: a config
    (ModelConfig JSON), and with it, optionally, the model's files by path."""

    config: str
    files: dict[str, bytes]


def load_override(parameters: Mapping[str, Parameter | bytes]) -> LoadOverride | None:
    """Triton's load parameters (`config`, `file:<path>`), checked in its words."""
    files: dict[str, bytes] = {}
    config: str | None = None
    for name, value in parameters.items():
        if name == "config":
            if not isinstance(value, str):
                raise InvalidArgument(
                    "invalid value type for load parameter 'config', expected string_param."
                )
            config = value
        elif name.startswith("file:"):
            if not isinstance(value, bytes):
                raise InvalidArgument(
                    f"invalid value type for load parameter '{name}', expected bytes_param."
                )
            files[name.removeprefix("file:")] = value
        else:
            raise InvalidArgument(f"unrecognized load parameter '{name}'")
    if files and config is None:
        raise InvalidArgument("Load parameter 'config' must be specified for model file override")
    return None if config is None else LoadOverride(config, files)


def check_unload_parameters(model: str, parameters: Mapping[str, Parameter | bytes]) -> bool:
    """Whether the unload asks for the model's dependents too (`unload_dependents`: the
    models an ensemble runs)."""
    for name, value in parameters.items():
        if name != "unload_dependents":
            raise InvalidArgument(f"unrecognized unload parameter '{name}'")
        if not isinstance(value, bool):
            raise InvalidArgument(
                f"invalid value type for unload parameter 'unload_dependents' of model "
                f"'{model}', expected bool_param"
            )
    return parameters.get("unload_dependents") is True


def _unknown(what: str) -> InvalidArgument:
    return InvalidArgument(f"{what} is not one kapi knows; kapi's models take no custom parameters")


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "a bool", int: "an int64", str: "a string"}
    return " or ".join(names[k] for k in kinds)
