"""The OIP datatype codec: raw row-major bytes and typed values to numpy, and back."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from kapi.core.errors import InvalidArgument, KapiError
from kapi.core.tensors import (
    DATATYPES,
    BytesCountError,
    Tensor,
    check_shape,
    datatype_of,
    element_count,
    from_raw,
    from_values,
    to_raw,
)
from ml_dtypes import bfloat16
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

SHAPE = (2, 3)


def _integers(dtype: type[np.integer[Any]]) -> npt.NDArray[Any]:
    info = np.iinfo(dtype)
    return np.array([info.min, info.max, 0, 1, info.max // 3, info.min // 5 + 1], dtype=dtype)


def _floats(dtype: type[np.floating[Any]]) -> npt.NDArray[Any]:
    info = np.finfo(dtype)
    return np.array([0.0, -1.5, info.max, -np.inf, info.tiny, 0.25], dtype=dtype)


INTEGERS: dict[str, type[np.integer[Any]]] = {
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}


def _samples() -> dict[str, npt.NDArray[Any]]:
    flat = {
        "BOOL": np.array([True, False, True, False, False, True]),
        **{datatype: _integers(dtype) for datatype, dtype in INTEGERS.items()},
        "FP16": _floats(np.float16),
        "FP32": _floats(np.float32),
        "FP64": _floats(np.float64),
        "BF16": np.array([1.0, -2.5, 0.15625, np.inf, 0.0, 3.0e38], dtype=bfloat16),
    }
    return {datatype: array.reshape(SHAPE) for datatype, array in flat.items()}


SAMPLES = _samples()
NUMERIC = sorted(SAMPLES)


def test_every_datatype_but_bytes_has_a_sample() -> None:
    assert set(NUMERIC) == DATATYPES - {"BYTES"}


@pytest.mark.parametrize("datatype", NUMERIC)
def test_from_raw_decodes_little_endian_row_major(datatype: str) -> None:
    expected = SAMPLES[datatype]
    raw = expected.astype(expected.dtype.newbyteorder("<")).tobytes(order="C")
    tensor = from_raw("x", datatype, SHAPE, raw)
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, SHAPE)
    assert tensor.data.dtype == expected.dtype
    assert tensor.data.shape == SHAPE
    np.testing.assert_array_equal(tensor.data, expected)
    assert to_raw(tensor) == raw


@pytest.mark.parametrize("datatype", NUMERIC)
def test_from_values_decodes_python_values(datatype: str) -> None:
    expected = SAMPLES[datatype]
    tensor = from_values("x", datatype, SHAPE, expected.reshape(-1).tolist())
    assert tensor.data.dtype == expected.dtype
    np.testing.assert_array_equal(tensor.data, expected)
    assert to_raw(tensor) == expected.tobytes()


def test_from_raw_does_not_copy() -> None:
    raw = np.arange(6, dtype=np.float32).tobytes()
    tensor = from_raw("x", "FP32", SHAPE, raw)
    assert not tensor.data.flags.owndata


def test_to_raw_is_row_major_for_a_transposed_array() -> None:
    data = np.arange(6, dtype=np.int32).reshape(3, 2).T
    assert (
        to_raw(Tensor("y", "INT32", (2, 3), data))
        == np.array([[0, 2, 4], [1, 3, 5]], dtype=np.int32).tobytes()
    )


@pytest.mark.parametrize(
    ("shape", "raw"), [((0,), b""), ((2, 0, 3), b""), ((), b"\x00\x00\x80\x3f")]
)
def test_empty_and_scalar_shapes(shape: tuple[int, ...], raw: bytes) -> None:
    tensor = from_raw("x", "FP32", shape, raw)
    assert tensor.data.shape == shape
    assert to_raw(tensor) == raw


@pytest.mark.parametrize(("datatype", "size"), [("FP32", 23), ("INT64", 40), ("BOOL", 7)])
def test_wrong_raw_byte_count_names_the_input(datatype: str, size: int) -> None:
    with pytest.raises(InvalidArgument, match=r"input 'image': \d+ bytes of raw contents"):
        from_raw("image", datatype, SHAPE, b"\x00" * size)


def test_wrong_raw_byte_count_states_what_was_expected() -> None:
    with pytest.raises(InvalidArgument) as raised:
        from_raw("image", "FP32", SHAPE, b"\x00" * 20)
    assert raised.value.message == (
        "input 'image': 20 bytes of raw contents, expected 24 for FP32 with shape [2, 3]"
    )


@pytest.mark.parametrize("decode", [from_raw, from_values])
def test_unknown_datatype_names_the_input(decode: Any) -> None:
    with pytest.raises(InvalidArgument, match="input 'x': unknown datatype 'FP8', expected one of"):
        decode("x", "FP8", (1,), b"\x00")


def test_from_values_rejects_a_wrong_count() -> None:
    with pytest.raises(InvalidArgument, match=r"input 'x': 5 elements in contents, expected 6"):
        from_values("x", "INT32", SHAPE, [1, 2, 3, 4, 5])


@pytest.mark.parametrize(
    ("datatype", "values"),
    [("INT8", [300]), ("UINT8", [-1]), ("UINT64", [2**64]), ("FP32", ["abc"])],
)
def test_from_values_rejects_values_that_do_not_fit(datatype: str, values: list[Any]) -> None:
    with pytest.raises(
        InvalidArgument, match=f"input 'x': contents do not fit {datatype}"
    ) as raised:
        from_values("x", datatype, (1,), values)
    assert raised.value.__cause__ is not None


# --- BYTES ---------------------------------------------------------------------------------

BYTES_VALUES = [b"ab", b"", "\u00e9".encode(), b"\x00\xff\x00", b"x" * 300, b"z"]
BYTES_WIRE = b"".join(len(value).to_bytes(4, "little") + value for value in BYTES_VALUES)


def test_bytes_wire_format_is_length_prefixed() -> None:
    assert BYTES_WIRE.startswith(b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9")
    data = np.array(BYTES_VALUES, dtype=np.object_).reshape(SHAPE)
    assert to_raw(Tensor("s", "BYTES", SHAPE, data)) == BYTES_WIRE


@pytest.mark.parametrize(
    "data",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.arange(6, dtype=np.int64)[::2],
        np.array(BYTES_VALUES, dtype=np.object_).reshape(SHAPE),
        np.array(["\u00e9t\u00e9", "ok"]),
        np.array([b"abc", b""]),
    ],
)
def test_raw_size_is_the_length_of_the_raw_encoding(data: npt.NDArray[Any]) -> None:
    tensor = Tensor("t", datatype_of(data), data.shape, data)
    assert tensor.raw_size == len(to_raw(tensor))


def test_bytes_from_raw() -> None:
    tensor = from_raw("s", "BYTES", SHAPE, BYTES_WIRE)
    assert tensor.data.dtype == np.object_
    assert tensor.data.shape == SHAPE
    assert tensor.data.reshape(-1).tolist() == BYTES_VALUES


def test_bytes_str_elements_are_utf8_encoded() -> None:
    data = np.array(["\u00e9t\u00e9", "ok"])
    assert to_raw(Tensor("s", "BYTES", (2,), data)) == b"\x05\x00\x00\x00\xc3\xa9t\xc3\xa9" + (
        b"\x02\x00\x00\x00ok"
    )


def test_bytes_match_tritonclient_serialization() -> None:
    data = np.array(BYTES_VALUES, dtype=np.object_).reshape(SHAPE)
    assert serialize_byte_tensor(data).item() == to_raw(Tensor("s", "BYTES", SHAPE, data))
    decoded = deserialize_bytes_tensor(BYTES_WIRE)
    assert decoded.tolist() == from_raw("s", "BYTES", SHAPE, BYTES_WIRE).data.reshape(-1).tolist()


def test_bytes_from_values() -> None:
    tensor = from_values("s", "BYTES", SHAPE, BYTES_VALUES)
    assert tensor.data.dtype == np.object_
    assert tensor.data.reshape(-1).tolist() == BYTES_VALUES
    assert to_raw(tensor) == BYTES_WIRE


@pytest.mark.parametrize(
    ("raw", "shape"),
    [
        (BYTES_WIRE[:-1], SHAPE),  # the last element's bytes are cut short
        (b"\xff\x00\x00\x00abc", (1,)),  # a length larger than what follows
    ],
)
def test_truncated_bytes_name_the_input(raw: bytes, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidArgument, match="input 'text': BYTES element truncated at offset"):
        from_raw("text", "BYTES", shape, raw)


def test_bytes_past_the_last_element_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="input 'text': BYTES contents go on past the 6"):
        from_raw("text", "BYTES", SHAPE, BYTES_WIRE + b"\x01\x00")


def test_fewer_bytes_elements_than_the_shape_has() -> None:
    with pytest.raises(InvalidArgument, match="input 'text': 6 BYTES elements, expected 7"):
        from_raw("text", "BYTES", (7,), BYTES_WIRE)


@pytest.mark.parametrize("shape", [(5,), (0,)])
def test_more_bytes_elements_than_the_shape_has(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidArgument, match=f"go on past the {shape[0]} elements"):
        from_raw("text", "BYTES", shape, BYTES_WIRE)


def test_a_huge_shape_with_few_bytes_allocates_nothing_for_the_missing_elements() -> None:
    """A trillion elements declared, six sent: counted as sent (Triton names the count),
    with nothing allocated for the shape (a trillion slots would not fit in memory)."""
    with pytest.raises(BytesCountError, match="6 BYTES elements, expected 1000000000000"):
        from_raw("text", "BYTES", (10**12,), bytes(24))


def test_a_malformed_bytes_tensor_stops_parsing_at_its_shapes_count() -> None:
    """10 M empty elements sent for a shape of 2: the parse stops after the second, so its
    error says what it saw by then, not how many there were (the old decoder counted all
    10 M in Python first, freezing the node for seconds)."""
    with pytest.raises(InvalidArgument, match="go on past the 2 elements its shape has"):
        from_raw("text", "BYTES", (1, 2), bytes(4 * 10_000_000))


def test_empty_bytes_tensor() -> None:
    tensor = from_raw("text", "BYTES", (0, 4), b"")
    assert tensor.data.shape == (0, 4)
    assert to_raw(tensor) == b""


@pytest.mark.parametrize("element", [5, None, 1.5])
def test_bytes_output_with_a_non_bytes_element_is_an_error(element: object) -> None:
    data = np.array([b"ok", element], dtype=np.object_)
    with pytest.raises(KapiError):
        to_raw(Tensor("out", "BYTES", (2,), data))


# --- helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", NUMERIC)
def test_datatype_of_numpy_arrays(datatype: str) -> None:
    assert datatype_of(SAMPLES[datatype]) == datatype


@pytest.mark.parametrize(
    "array", [np.array(["a"]), np.array([b"a"]), np.array([b"a"], dtype=np.object_)]
)
def test_datatype_of_strings_is_bytes(array: npt.NDArray[Any]) -> None:
    assert datatype_of(array) == "BYTES"


def test_datatype_of_unsupported_dtype() -> None:
    with pytest.raises(InvalidArgument, match="numpy dtype complex64 has no OIP datatype"):
        datatype_of(np.zeros(2, dtype=np.complex64))


@pytest.mark.parametrize(("shape", "count"), [((), 1), ((0,), 0), ((2, 3, 4), 24), ([5], 5)])
def test_element_count(shape: tuple[int, ...], count: int) -> None:
    assert element_count(shape) == count


def test_check_shape_returns_a_tuple() -> None:
    assert check_shape("x", [1, 0, 3]) == (1, 0, 3)


def test_check_shape_rejects_a_negative_dimension() -> None:
    with pytest.raises(InvalidArgument, match=r"input 'x': shape \[-1, 3\] has a negative"):
        check_shape("x", [-1, 3])


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**40, 2**40, 0], [2**63 - 1]])
def test_check_shape_rejects_a_shape_no_tensor_can_have(shape: list[int]) -> None:
    """The element count is 0 or small once a 0 is in it, but numpy cannot make an array of
    such a shape at all; it is the request's fault, not an internal error."""
    with pytest.raises(InvalidArgument, match="is too large for any tensor"):
        check_shape("x", shape)


def test_check_shape_takes_a_large_zero_sized_shape_numpy_can_make() -> None:
    assert check_shape("x", [0, 2**20, 2**20]) == (0, 2**20, 2**20)
    assert from_raw("x", "FP32", (0, 2**20, 2**20), b"").data.shape == (0, 2**20, 2**20)
