"""Triton's system shared memory extension: a client on the same host registers a POSIX
shared memory region (`shm_open` key), then names it in a request's input and output
parameters (`shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`), so
tensors are not copied through the transport. Errors are in Triton's words
(server `shared_memory_manager.cc`, `grpc_utils.h` ParseSharedMemoryParams).

Regions are mapped once, at registration. A request holds the regions it uses until it is
answered; a region in use cannot be unregistered. CUDA shared memory is a separate
extension that a GPU node adds; without a GPU it is refused.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kapi.core.errors import AlreadyExists, InternalError, InvalidArgument, NotFound
from kapi.core.inference import EncodedTensor, InferenceRequest, Parameter, RequestedOutput
from kapi.core.tensors import Tensor, to_raw

SHM_ROOT = Path("/dev/shm")  # where Linux keeps POSIX shared memory objects
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = frozenset((REGION, BYTE_SIZE, OFFSET))


@dataclass(eq=False)  # a region is itself
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    users: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a tensor's data lies: `byte_size` bytes at `offset` in a registered region."""

    region: str
    offset: int
    byte_size: int


@dataclass
class Held:
    """The regions one request uses, and where its outputs go."""

    outputs: dict[str, Placement] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)


def placement(tensor: str, parameters: Mapping[str, Parameter]) -> Placement | None:
    """The shared memory a tensor's parameters name, checked in Triton's words."""
    region = parameters.get(REGION)
    for name in (OFFSET, BYTE_SIZE):
        if name in parameters and region is None:
            raise InvalidArgument(
                f"'{name}' can not be specified without '{REGION}' parameter for tensor '{tensor}'"
            )
    if region is None:
        return None
    if not isinstance(region, str):
        raise InvalidArgument(
            f"invalid value type for '{REGION}' parameter for tensor '{tensor}', expected "
            "string_param."
        )
    values = []
    for name, default in ((OFFSET, 0), (BYTE_SIZE, None)):
        value = parameters.get(name, default)
        if value is None:
            raise InvalidArgument(
                f"'{BYTE_SIZE}' must be specified with '{REGION}' for tensor '{tensor}'"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(
                f"invalid value type for '{name}' parameter for tensor '{tensor}', expected "
                "int64_param."
            )
        values.append(value)
    return Placement(region, values[0], values[1])


class SharedMemoryManager:
    def __init__(self, root: Path = SHM_ROOT) -> None:
        self._root = root
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if name in self._regions:  # Triton's words
            raise AlreadyExists(f"shared memory region '{name}' already in manager")
        path = self._root / key.removeprefix("/")
        if not key.removeprefix("/") or "/" in key.removeprefix("/"):
            raise InternalError(f"Unable to open shared memory region: '{key}'")
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise InternalError(f"Unable to open shared memory region: '{key}'") from exc
        try:
            size = os.fstat(fd).st_size
            if offset < 0 or byte_size <= 0 or offset + byte_size > size:
                raise InvalidArgument(
                    f"failed to register shared memory region '{name}': invalid args "
                    f"(offset {offset} + byte_size {byte_size}, the region holds {size} bytes)"
                )
            mapping = mmap.mmap(fd, offset + byte_size)
        finally:
            os.close(fd)
        self._regions[name] = Region(name, key, offset, byte_size, mapping)

    def status(self, name: str = "") -> list[Region]:
        if not name:
            return list(self._regions.values())
        region = self._regions.get(name)
        if region is None:  # Triton's words
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        return [region]

    def unregister(self, name: str = "") -> None:
        """One region, or every one; a name not registered is nothing to do."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.get(each)
            if region is None:
                continue
            if region.users:  # Triton's words
                raise InternalError(
                    f"Cannot unregister shared memory region '{each}', it is currently in use."
                )
            del self._regions[each]
            with contextlib.suppress(BufferError):  # a view still referenced: freed with it
                region.mapping.close()

    def close(self) -> None:
        for region in self._regions.values():
            with contextlib.suppress(BufferError):
                region.mapping.close()
        self._regions.clear()

    @contextlib.contextmanager
    def attach(self, request: InferenceRequest) -> Iterator[Held]:
        """Point the request's shared-memory inputs at their regions, and note where its
        outputs go; the regions are held until the block ends."""
        held = Held()
        try:
            for tensor in request.inputs:
                where = placement(tensor.name, tensor.parameters)
                if where is not None:
                    _strip(tensor.parameters)
                    self._attach_input(tensor, where, held, request.model_name)
            for output in request.outputs:
                where = placement(output.name, output.parameters)
                if where is not None:
                    _check_output(output)
                    _strip(output.parameters)
                    held.outputs.setdefault(output.name, where)
                    self._view(where, held)  # checks the region and bounds now
            yield held
        finally:
            for region in held.regions:
                region.users -= 1

    def write_outputs(self, outputs: list[Tensor], held: Held) -> set[str]:
        """Copy the outputs placed in shared memory there; the names of those written."""
        written = set()
        for tensor in outputs:
            where = held.outputs.get(tensor.name)
            if where is None:
                continue
            size = tensor.raw_size
            if size > where.byte_size:  # Triton's words
                raise InternalError(
                    f"shared memory size specified with the request for output "
                    f"'{tensor.name}' ({where.byte_size} bytes) should be at least {size} "
                    "bytes to hold the results"
                )
            view = self._view(where, held)
            if tensor.datatype == "BYTES":
                view[:size] = to_raw(tensor)
            else:  # straight from the array: one copy
                target = np.frombuffer(view, dtype=tensor.data.dtype, count=tensor.data.size)
                target[...] = tensor.data.reshape(-1)
            written.add(tensor.name)
        return written

    def _attach_input(
        self, tensor: EncodedTensor, where: Placement, held: Held, model: str
    ) -> None:
        if tensor.raw is not None or len(tensor.values):  # Triton's words
            raise InvalidArgument(
                f"unexpected 'content' provided when using shared memory for input tensor "
                f"'{tensor.name}' for model '{model}'"
            )
        view = self._view(where, held)
        tensor.raw = view.tobytes() if tensor.datatype == "BYTES" else view

    def _view(self, where: Placement, held: Held) -> memoryview:
        region = self._regions.get(where.region)
        if region is None:  # Triton's words
            raise NotFound(f"Unable to find shared memory region: '{where.region}'")
        if where.offset >= region.byte_size:
            raise InvalidArgument(f"Invalid offset for shared memory region: '{where.region}'")
        if where.offset + where.byte_size > region.byte_size:
            raise InvalidArgument(
                f"Invalid offset + byte size for shared memory region: '{where.region}'"
            )
        if region not in held.regions:
            region.users += 1
            held.regions.append(region)
        start = region.offset + where.offset
        return memoryview(region.mapping)[start : start + where.byte_size]


def _check_output(output: RequestedOutput) -> None:
    if "classification" in output.parameters:  # Triton's words
        raise InvalidArgument("output can't set both 'shared_memory_region' and 'classification'")


def _strip(parameters: dict[str, Parameter]) -> None:
    for name in PARAMETERS:
        parameters.pop(name, None)
