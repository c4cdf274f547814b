"""The KServe v2 REST encoding of inference requests and responses: JSON tensors, and
Triton's binary tensor data extension, converted to and from kapi's transport-free types.

A request body is a JSON header, optionally followed by binary tensor data; the header's
length comes in the `Inference-Header-Content-Length` HTTP header. An input with the
`binary_data_size` parameter takes that many bytes of the binary data, in the order of the
inputs. Binary data is sliced, never copied or looped over element by element.

A response's outputs are JSON `data`, or binary data after the JSON header when the request
asked for it (`binary_data` on a requested output, `binary_data_output` for the outputs it
did not list), as Triton answers them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from kapi.core.errors import InvalidArgument, Unimplemented
from kapi.core.inference import (
    EncodedTensor,
    InferenceRequest,
    InferenceResponse,
    Parameter,
    RequestedOutput,
    RequestLimits,
    check_counts,
)
from kapi.core.tensors import (
    DATATYPES,
    NUMPY_DTYPES,
    Tensor,
    check_shape,
    element_count,
    to_raw,
)

HEADER_LENGTH = "inference-header-content-length"
_JSON_ONLY_IN_BINARY = ("FP16", "BF16")  # Triton takes and gives these as binary data only
_NUMERIC_KINDS = {"b": "b", "u": "ui", "i": "ui", "f": "uif"}  # JSON value kinds each takes


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A response body in parts (the JSON header, then binary outputs), and the length of
    its JSON header when binary parts follow it (None for a JSON-only body)."""

    parts: list[bytes]
    header_length: int | None

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)


def parse_header_length(value: str | None, body_length: int) -> int:
    """The JSON header's length: the whole body without the HTTP header."""
    if value is None:
        return body_length
    try:
        length = int(value)
    except ValueError:
        length = -1
    if not 0 < length <= body_length:  # Triton's words; 0 asks for a raw request
        if length == 0:
            raise Unimplemented(
                "Inference-Header-Content-Length 0 (a raw binary request, without a JSON "
                "header) is not supported by kapi; send a JSON header and binary_data_size"
            )
        raise InvalidArgument(
            f"inference header size should be in range (0, {body_length}), got: {value}"
        )
    return length


def request_from_http(
    body: bytes,
    header_length: int,
    model_name: str,
    model_version: str,
    limits: RequestLimits,
) -> tuple[InferenceRequest, set[str], bool]:
    """The request with its inputs still encoded; and which outputs to send as binary data
    (those requested with `binary_data`), and whether unlisted outputs go as binary."""
    header = _parse_json(memoryview(body)[:header_length])
    if not isinstance(header, dict):
        raise InvalidArgument("the request JSON must be an object with 'inputs'")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("Unable to parse 'inputs': the request must have an 'inputs' array")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("Unable to parse 'outputs': it must be an array")
    check_counts(model_name, len(inputs), len(outputs), limits)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("Unable to parse 'id': it must be a string")
    parameters = _parameters(header.get("parameters", {}), limits.parameters, "the request")
    binary_default = parameters.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument("Unable to parse 'binary_data_output': it must be a bool")
    binary = memoryview(body)[header_length:]
    tensors, offset = [], 0
    for index, item in enumerate(inputs):
        tensor, offset = _input(item, index, binary, offset, model_name, limits.parameters)
        tensors.append(tensor)
    if offset != len(binary):  # Triton's words
        raise InvalidArgument(f"unexpected additional input data for model '{model_name}'")
    requested, binary_outputs = [], set()
    for index, item in enumerate(outputs):
        output, as_binary = _output(item, index, limits.parameters)
        requested.append(output)
        if as_binary:
            binary_outputs.add(output.name)
    request = InferenceRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=tensors,
        outputs=requested,
        parameters=parameters,
    )
    return request, binary_outputs, binary_default


def response_to_http(
    response: InferenceResponse,
    binary_outputs: set[str],
    binary_default: bool,
    listed: set[str],
) -> HttpResponse:
    """The response's JSON header and binary parts. An output the request listed goes as
    binary only if it asked so; an output it did not list, as `binary_data_output` says."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        binary = tensor.name in binary_outputs if tensor.name in listed else binary_default
        if tensor.name in response.shared_memory:
            pass  # written to shared memory: neither data nor binary data, as Triton answers
        elif binary:
            raw = to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            if raw:
                blobs.append(raw)
        else:
            entry["data"] = _json_data(tensor)
        outputs.append(entry)
    header: dict[str, Any] = {}
    if response.id:
        header["id"] = response.id
    header["model_name"] = response.model_name
    header["model_version"] = response.model_version
    header["outputs"] = outputs
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return HttpResponse([encoded], None)
    return HttpResponse([encoded, *blobs], len(encoded))


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def message_to_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST API renders it: field names as in the .proto,
    fields at their defaults included, enums by name, and 64-bit integers as JSON numbers
    (protobuf's JSON makes them strings; Triton turns them back, and so does kapi)."""
    value = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, value)
    return value


_INT64 = frozenset(
    (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    )
)


def _numbers(descriptor: Any, value: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name in value:
            value[field.name] = _number(field, value[field.name])


def _number(field: FieldDescriptor, item: Any) -> Any:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        entry = message.fields_by_name["value"]
        return {key: _single(entry, element) for key, element in item.items()}
    if field.is_repeated:
        return [_single(field, element) for element in item]
    return _single(field, item)


def _single(field: FieldDescriptor, item: Any) -> Any:
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Any":
            return item
        _numbers(field.message_type, item)
        return item
    return int(item) if field.type in _INT64 else item


def _parse_json(data: memoryview | bytes) -> Any:
    """Strict JSON, fast; or, as Triton also reads, JSON with NaN and Infinity numbers
    (which tritonclient writes for such values)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(bytes(data))
        except ValueError:  # Triton's words, then the parser's
            raise InvalidArgument(f"failed to parse the request JSON buffer: {exc}") from exc


def _parameters(value: object, limit: int, where: str) -> dict[str, Parameter]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"Unable to parse 'parameters' of {where}: it must be an object")
    if len(value) > limit:
        raise InvalidArgument(
            f"{where} carries {len(value)} parameters; kapi takes at most {limit}"
        )
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):  # Triton's words
            raise InvalidArgument(
                f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or "
                "'string'."
            )
    return value


def _input(
    item: object,
    index: int,
    binary: memoryview,
    offset: int,
    model: str,
    parameter_limit: int,
) -> tuple[EncodedTensor, int]:
    if not isinstance(item, dict):
        raise InvalidArgument(f"Unable to parse 'inputs': input {index} must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str):
        raise InvalidArgument(f"Unable to parse 'name' of input {index}: it must be a string")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"Unable to parse 'datatype' of input '{name}': it must be a string")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) for dim in shape
    ):
        raise InvalidArgument(
            f"Unable to parse 'shape' of input '{name}': it must be an array of integers"
        )
    checked = check_shape(name, shape)
    parameters = _parameters(item.get("parameters", {}), parameter_limit, f"input '{name}'")
    size = parameters.pop("binary_data_size", None)
    has_data = "data" in item
    in_shm = "shared_memory_region" in parameters
    if has_data + (size is not None) + in_shm != 1:  # Triton's words
        given = (
            " 'data'" * has_data
            + " 'binary_data_size'" * (size is not None)
            + " 'shared_memory_region'" * in_shm
        )
        raise InvalidArgument(
            "Input must set only one of the following fields: 'data', 'binary_data_size' in "
            f"'parameters', 'shared_memory_region' in 'parameters'. But "
            f"{'set' + given if given else 'no field is set'}"
        )
    if in_shm:  # its data is found in the region, later
        return EncodedTensor(name, datatype, checked, None, parameters=parameters), offset
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(
                f"Unable to parse 'binary_data_size' of input '{name}': it must be an integer >= 0"
            )
        if offset + size > len(binary):  # Triton's words
            raise InvalidArgument(
                f"unexpected size for input '{name}', expecting {offset + size - len(binary)} "
                f"additional bytes for model '{model}'"
            )
        raw = binary[offset : offset + size]
        # BYTES are parsed element by element: bytes; others are viewed in place.
        contents = raw.tobytes() if datatype == "BYTES" else raw
        return EncodedTensor(name, datatype, checked, contents, parameters=parameters), (
            offset + size
        )
    values = _json_values(name, datatype, checked, item["data"])
    return EncodedTensor(name, datatype, checked, None, values, parameters), offset


def _json_values(name: str, datatype: str, shape: tuple[int, ...], data: object) -> Any:
    """JSON `data`, flat or nested, as a flat array of the datatype; values must be of the
    JSON kind the datatype takes and fit it."""
    if datatype in _JSON_ONLY_IN_BINARY:  # Triton's words
        raise InvalidArgument(
            f"receiving {datatype} data via JSON is not supported. Please use the binary data "
            f"format for input {name}"
        )
    if datatype not in DATATYPES:
        raise InvalidArgument(f"invalid datatype for input {name}")
    if not isinstance(data, list):
        raise InvalidArgument(f"Unable to parse 'data' of input '{name}': it must be an array")
    try:
        array = np.array(data, dtype=object if datatype == "BYTES" else None)
    except ValueError as exc:
        raise InvalidArgument(
            f"Unable to parse 'data' of input '{name}': its nested arrays are ragged"
        ) from exc
    flat = array.reshape(-1)
    count = element_count(shape)
    if flat.size != count and datatype != "BYTES":  # Triton's words, then how far off
        raise InvalidArgument(
            f"Unable to parse 'data': Shape does not match true shape of 'data' field: input "
            f"'{name}' has {flat.size} elements, its shape {list(shape)} holds {count}"
        )
    if datatype == "BYTES":
        if not all(isinstance(value, str) for value in flat):
            raise InvalidArgument(
                f"Unable to parse 'data' of BYTES input '{name}': every element must be a string"
            )
        return [value.encode() for value in flat]
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind in "ui" and flat.dtype.kind == "f":
        return _large_integers(name, datatype, data, flat)
    if flat.size and flat.dtype.kind not in _NUMERIC_KINDS[dtype.kind]:
        raise InvalidArgument(
            f"Unable to parse 'data' of {datatype} input '{name}': expected "
            f"{_KIND_WORDS[dtype.kind]}, got {_describe(flat)}"
        )
    if dtype.kind in "ui" and flat.size:
        limits = np.iinfo(dtype.type)  # type: ignore[type-var]
        if flat.min() < limits.min or flat.max() > limits.max:
            raise InvalidArgument(
                f"Unable to parse 'data' of {datatype} input '{name}': values outside "
                f"[{limits.min}, {limits.max}]"
            )
    return flat.astype(dtype, copy=False)


def _large_integers(name: str, datatype: str, data: list[Any], flat: Any) -> Any:
    """numpy reads integers past int64 mixed with others as floats: read them again as the
    datatype, and accept them only if none was a fraction."""
    dtype = NUMPY_DTYPES[datatype]
    try:
        exact = np.array(data, dtype=dtype).reshape(-1)
    except (OverflowError, TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"Unable to parse 'data' of {datatype} input '{name}': values do not fit: {exc}"
        ) from exc
    if not np.array_equal(exact.astype(np.float64), flat):
        raise InvalidArgument(
            f"Unable to parse 'data' of {datatype} input '{name}': expected integers, got numbers"
        )
    return exact


_KIND_WORDS = {"b": "true or false", "u": "integers", "i": "integers", "f": "numbers"}


def _describe(array: np.ndarray[Any, Any]) -> str:
    kinds = {"b": "booleans", "u": "integers", "i": "integers", "f": "numbers", "U": "strings"}
    return kinds.get(array.dtype.kind, "values of mixed JSON types")


def _output(item: object, index: int, parameter_limit: int) -> tuple[RequestedOutput, bool]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidArgument(f"Unable to parse 'outputs': output {index} must have a 'name'")
    name = item["name"]
    parameters = _parameters(item.get("parameters", {}), parameter_limit, f"output '{name}'")
    binary = parameters.pop("binary_data", False)
    if binary and "shared_memory_region" in parameters:  # Triton's words
        raise InvalidArgument("Output can't set both 'shared_memory_region' and 'binary_data'")
    if not isinstance(binary, bool):
        raise InvalidArgument(
            f"Unable to parse 'binary_data' of output '{name}': it must be a bool"
        )
    return RequestedOutput(name, parameters), binary


def _json_data(tensor: Tensor) -> Any:
    if tensor.datatype in _JSON_ONLY_IN_BINARY:  # Triton's words, then the way out
        raise InvalidArgument(
            f"sending {tensor.datatype} data via JSON is not supported. Please use the binary "
            f"data format for output '{tensor.name}' (binary_data: true)"
        )
    flat = tensor.data.reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        # NaN and Infinity, as Triton writes them (orjson would write null).
        return orjson.Fragment(json.dumps(flat.tolist()).encode())
    if tensor.datatype != "BYTES":
        return np.ascontiguousarray(flat)
    strings = []
    for value in flat.tolist():
        try:
            strings.append(value.decode() if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"output '{tensor.name}' holds bytes that are not UTF-8, which JSON cannot "
                "carry; request it with binary_data: true"
            ) from None
    return strings
