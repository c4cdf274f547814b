"""The light tensor type of the hot path and the OIP datatype codec.

A tensor is a name, an OIP datatype ("FP32", "BYTES", ...), a shape and a numpy array. BYTES
tensors are numpy object arrays of `bytes`; on the wire each element is a 4-byte
little-endian length followed by its bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from ml_dtypes import bfloat16  # BF16 has no numpy dtype of its own; tritonclient uses this

from kapi.core.errors import InvalidArgument

NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
    "BF16": np.dtype(bfloat16),
}

DATATYPES = frozenset(NUMPY_DTYPES)
_BY_NUMPY = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
_LENGTH = struct.Struct("<I")
# More elements than any tensor can have: numpy's byte count of the largest itemsize must fit.
_MAX_ELEMENTS = np.iinfo(np.intp).max // 16
_JOIN_PARTS = 1 << 14  # parts a BYTES encoding joins at once
# What converting one element to or from a Python object costs, against copying one byte.
OBJECT_COST = 8


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[np.generic]
    raw: bytes | None = None  # its raw encoding, once made (BYTES take work to encode)

    @property
    def encode_cost(self) -> int:
        """Roughly how many bytes of work its raw encoding takes: BYTES element by element,
        fixed-size datatypes one copy (counted as none)."""
        return self.data.size * OBJECT_COST if self.datatype == "BYTES" else 0

    @property
    def raw_size(self) -> int:
        """The length of its raw encoding: known for fixed-size datatypes, made for BYTES."""
        if self.datatype != "BYTES":
            return self.data.nbytes
        if self.raw is None:
            self.raw = serialize_bytes(self.data)
        return len(self.raw)


def datatype_of(array: npt.NDArray[np.generic]) -> str:
    """The OIP datatype of a numpy array; strings and bytes become BYTES."""
    if array.dtype.kind in "SUO":
        return "BYTES"
    try:
        return _BY_NUMPY[array.dtype]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {array.dtype} has no OIP datatype") from None


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(name: str, shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """A request's shape: no negative dimension, and one numpy can hold. numpy refuses a
    shape whose non-zero dimensions multiply past its index range even when another is 0."""
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
    if element_count([dim for dim in shape if dim]) > _MAX_ELEMENTS:
        raise InvalidArgument(f"input '{name}': shape {list(shape)} is too large for any tensor")
    return tuple(shape)


def from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> Tensor:
    """Decode one tensor from its raw row-major bytes, without copying where possible."""
    dtype = _dtype(name, datatype)
    count = element_count(shape)
    if datatype == "BYTES":
        array = deserialize_bytes(name, bytes(raw), count)
    else:
        check_raw_size(name, datatype, shape, len(raw))
        array = np.frombuffer(raw, dtype=dtype)
    return Tensor(name, datatype, shape, array.reshape(shape))


def check_raw_size(name: str, datatype: str, shape: tuple[int, ...], size: int) -> None:
    """Raw contents of a fixed-size datatype must be exactly its shape's worth of bytes."""
    expected = element_count(shape) * _dtype(name, datatype).itemsize
    if size != expected:
        raise InvalidArgument(
            f"input '{name}': {size} bytes of raw contents, expected {expected} "
            f"for {datatype} with shape {list(shape)}"
        )


def from_values(name: str, datatype: str, shape: tuple[int, ...], values: object) -> Tensor:
    """Decode one tensor given as typed contents (a sequence of Python values)."""
    dtype = _dtype(name, datatype)
    count = element_count(shape)
    try:
        array = np.array(values, dtype=dtype)
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(f"input '{name}': contents do not fit {datatype}: {exc}") from exc
    if array.size != count:
        raise InvalidArgument(
            f"input '{name}': {array.size} elements in contents, expected {count} "
            f"for shape {list(shape)}"
        )
    return Tensor(name, datatype, shape, array.reshape(shape))


def to_raw(tensor: Tensor) -> bytes:
    """Encode a tensor as raw row-major bytes, the only way kapi sends outputs."""
    if tensor.raw is not None:
        return tensor.raw
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data).tobytes()


def _element_bytes(item: object) -> bytes | None:
    """A BYTES element's bytes (str as UTF-8); None when it is neither bytes nor str."""
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytes):
        return item
    return None


def serialize_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """The length-prefixed encoding of every element. Joined a chunk at a time: one join of
    millions of parts would hold the GIL, and so the event loop, for a long while."""
    chunks: list[bytes] = []
    parts: list[bytes] = []
    item: Any
    for item in array.reshape(-1).tolist():
        value = _element_bytes(item)
        if value is None:
            raise InvalidArgument(
                f"a BYTES element must be bytes or str, got {type(item).__name__}: {item!r}"
            )
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
        if len(parts) >= _JOIN_PARTS:
            chunks.append(b"".join(parts))
            parts.clear()
    chunks.append(b"".join(parts))
    return b"".join(chunks)


class BytesCountError(InvalidArgument):
    """BYTES raw contents that hold another number of elements than the shape has; `given`
    is None when there are more (the parse stops at the expected count)."""

    def __init__(self, message: str, name: str, expected: int, given: int | None) -> None:
        super().__init__(message)
        self.name, self.expected, self.given = name, expected, given


def deserialize_bytes(name: str, raw: bytes, count: int) -> npt.NDArray[np.object_]:
    """`count` length-prefixed elements. The parse stops as soon as the contents prove to
    hold more or fewer than `count`, so a malformed request costs at most `count` steps, and
    nothing is allocated for elements the contents do not hold."""
    size = len(raw)
    items: list[bytes] = []
    offset = 0
    while offset < size:
        if len(items) == count:
            raise BytesCountError(
                f"input '{name}': BYTES contents go on past the {count} elements its shape has",
                name,
                count,
                None,
            )
        if offset + 4 > size:
            raise InvalidArgument(
                f"input '{name}': incomplete string length indicator at offset {offset}, "
                f"expecting 4 bytes but only {size - offset} bytes available"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidArgument(f"input '{name}': BYTES element truncated at offset {offset}")
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise BytesCountError(
            f"input '{name}': {len(items)} BYTES elements, expected {count} for its shape",
            name,
            count,
            len(items),
        )
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def _dtype(name: str, datatype: str) -> np.dtype[np.generic]:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise InvalidArgument(
            f"input '{name}': unknown datatype '{datatype}', expected one of {sorted(DATATYPES)}"
        ) from None
