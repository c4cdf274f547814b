"""Triton's sequence batcher (`sequence_batching`), for stateful models: the requests of one
sequence carry its correlation id (`sequence_id`) and `sequence_start` / `sequence_end`
flags, run one at a time and in order, and reach the model with

- the control inputs the config names: START, END, READY (1 or 0, as its `fp32_false_true`,
  `int32_false_true` or `bool_false_true` says) and CORRID (the id);
- the implicit state (`state`): each state input holds what the state output gave on the
  sequence's previous request, or its initial state (zeros) on the first; this is how an
  ONNX model carries a stream's state from one chunk to the next.

Requests of different sequences batch together (at most one of each sequence per batch), as
the `oldest` strategy does, with its (or `direct`'s) queue delay. A sequence that sees no
request for `max_sequence_idle_microseconds` is released; a request without START for a
sequence not in progress is refused in Triton's words. With `direct`, Triton also pins each
sequence to one batch slot of one instance, which only a model that keeps state of its own
inside the runtime needs; kapi's runtimes keep none, so the slot is not tracked.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.core.tensors import NUMPY_DTYPES
from kapi.node.config import oip_datatype
from kapi.node.runtimes import Arrays

Control = mc.ModelSequenceBatching.Control
SequenceId = int | str


@dataclass(frozen=True, slots=True)
class ControlInput:
    name: str
    kind: int  # Control.Kind
    values: tuple[Any, Any]  # (false, true), for START, END and READY
    dtype: np.dtype[Any]


@dataclass(frozen=True, slots=True)
class StateTensor:
    input: str
    output: str
    dtype: np.dtype[Any]
    initial_shape: tuple[int, ...]


@dataclass
class _Sequence:
    state: Arrays
    last_ns: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def controls_of(config: mc.ModelConfig) -> list[ControlInput]:
    controls = []
    for control_input in config.sequence_batching.control_input:
        for control in control_input.control:
            if control.kind == Control.CONTROL_SEQUENCE_CORRID:
                dtype = NUMPY_DTYPES[oip_datatype(control.data_type)]
                controls.append(ControlInput(control_input.name, control.kind, (0, 0), dtype))
                continue
            given = [
                (list(getattr(control, attribute)), datatype)
                for attribute, datatype in (
                    ("fp32_false_true", "FP32"),
                    ("int32_false_true", "INT32"),
                    ("bool_false_true", "BOOL"),
                )
                if getattr(control, attribute)
            ]
            if not given:
                raise InvalidArgument(
                    f"model '{config.name}': control input '{control_input.name}' must give "
                    "its false and true values (fp32_false_true, int32_false_true or "
                    "bool_false_true)"
                )
            values, datatype = given[0]
            if len(values) != 2:
                raise InvalidArgument(
                    f"model '{config.name}': control input '{control_input.name}' must give "
                    "exactly two values, false then true"
                )
            dtype = NUMPY_DTYPES[datatype]
            controls.append(
                ControlInput(control_input.name, control.kind, (values[0], values[1]), dtype)
            )
    return controls


def states_of(config: mc.ModelConfig) -> list[StateTensor]:
    states = []
    for state in config.sequence_batching.state:
        initial = list(state.initial_state)
        if initial and initial[0].WhichOneof("state_data") != "zero_data":
            raise InvalidArgument(
                f"model '{config.name}': state '{state.input_name}': only zero_data initial "
                "states are supported by kapi"
            )
        shape = tuple(initial[0].dims) if initial else tuple(state.dims)
        if any(dim < 0 for dim in shape):
            raise InvalidArgument(
                f"model '{config.name}': state '{state.input_name}' has variable dims "
                f"{list(shape)}; give its initial_state dims"
            )
        dtype = NUMPY_DTYPES[oip_datatype(state.data_type)]
        states.append(StateTensor(state.input_name, state.output_name, dtype, shape))
    return states


def inner_batching(config: mc.ModelConfig) -> mc.ModelDynamicBatching | None:
    """The dynamic batching the sequences' requests get: the strategy's delay and sizes."""
    if config.max_batch_size <= 0:
        return None
    batching = config.sequence_batching
    strategy = batching.oldest if batching.HasField("oldest") else batching.direct
    policy = mc.ModelDynamicBatching(
        max_queue_delay_microseconds=strategy.max_queue_delay_microseconds,
        preferred_batch_size=list(getattr(strategy, "preferred_batch_size", [])),
    )
    return policy


class SequenceBatcher:
    """Runs each request of a sequence model with its controls and state, over an inner
    scheduler that batches requests of different sequences."""

    def __init__(self, config: mc.ModelConfig, inner: Any) -> None:
        self.model = config.name
        self.merges = getattr(inner, "merges", False)
        self._inner = inner
        self._batching = config.max_batch_size > 0
        self._controls = controls_of(config)
        self._states = states_of(config)
        self._idle_ns = config.sequence_batching.max_sequence_idle_microseconds * 1000
        self._string_ids = any(
            c.kind == Control.CONTROL_SEQUENCE_CORRID and c.dtype.kind == "O"
            for c in self._controls
        )
        self._sequences: dict[SequenceId, _Sequence] = {}

    async def submit(self, job: Any) -> Arrays:
        sequence_id, start, end = job.sequence
        self._check_id(sequence_id)
        self._release_idle()
        sequence = self._sequences.get(sequence_id)
        if start:
            sequence = _Sequence(self._initial_state(), time.monotonic_ns())
            self._sequences[sequence_id] = sequence
        elif sequence is None:  # Triton's words
            raise InvalidArgument(
                f"inference request for sequence {sequence_id} to model '{self.model}' must "
                "specify the START flag on the first request of the sequence"
            )
        async with sequence.lock:  # one request of a sequence at a time, in order
            sequence.last_ns = time.monotonic_ns()
            wanted = list(job.outputs)
            job.inputs = {
                **job.inputs,
                **self._control_arrays(sequence_id, start, end),
                **sequence.state,
            }
            job.outputs = [*wanted, *(state.output for state in self._states)]
            job.signature = (*job.signature, *self._state_signature(sequence.state))
            try:
                outputs = await self._inner.submit(job)
            finally:
                job.outputs = wanted
                if end and self._sequences.get(sequence_id) is sequence:
                    del self._sequences[sequence_id]
            sequence.state = {state.input: outputs[state.output] for state in self._states}
            sequence.last_ns = time.monotonic_ns()
        return {name: outputs[name] for name in wanted}

    async def close(self) -> None:
        self._sequences.clear()
        await self._inner.close()

    @property
    def active(self) -> int:
        return len(self._sequences)

    def _check_id(self, sequence_id: SequenceId) -> None:
        if sequence_id in (0, ""):  # Triton's words
            raise InvalidArgument(
                f"inference request to model '{self.model}' must specify a non-zero or "
                "non-empty correlation ID"
            )
        if isinstance(sequence_id, str) != self._string_ids:
            kind = "a string" if self._string_ids else "an integer"
            raise InvalidArgument(
                f"model '{self.model}': its sequence correlation ids are {kind}, got "
                f"{sequence_id!r}"
            )

    def _release_idle(self) -> None:
        now = time.monotonic_ns()
        idle = [
            key
            for key, sequence in self._sequences.items()
            if not sequence.lock.locked() and now - sequence.last_ns > self._idle_ns
        ]
        for key in idle:
            del self._sequences[key]

    def _rows(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *shape) if self._batching else shape

    def _initial_state(self) -> Arrays:
        return {s.input: np.zeros(self._rows(s.initial_shape), s.dtype) for s in self._states}

    def _state_signature(self, state: Arrays) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple(
            (name, "state", tuple(array.shape[1:] if self._batching else array.shape))
            for name, array in sorted(state.items())
        )

    def _control_arrays(self, sequence_id: SequenceId, start: bool, end: bool) -> Arrays:
        arrays: Arrays = {}
        flags: dict[int, bool] = {
            Control.CONTROL_SEQUENCE_START: start,
            Control.CONTROL_SEQUENCE_END: end,
            Control.CONTROL_SEQUENCE_READY: True,
        }
        shape = self._rows((1,))
        for control in self._controls:
            if control.kind == Control.CONTROL_SEQUENCE_CORRID:
                value: Any = sequence_id.encode() if isinstance(sequence_id, str) else sequence_id
                array: npt.NDArray[Any] = np.empty(shape, control.dtype)
                try:
                    array[...] = value
                except (OverflowError, ValueError) as exc:
                    raise InvalidArgument(
                        f"model '{self.model}': sequence_id {sequence_id!r} does not fit its "
                        f"CORRID control input '{control.name}' ({control.dtype}): {exc}"
                    ) from exc
            else:
                array = np.empty(shape, control.dtype)
                array[...] = control.values[flags[control.kind]]
            arrays[control.name] = array
        return arrays
