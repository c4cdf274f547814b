"""A small protobuf wire reader for the fields a ModelInferRequest is routed by.

The gateway forwards requests as the bytes the client sent. To route one it needs only the
model name, the version and the request parameters, which sit before the tensors
(fields 1, 2 and 4 of `inference.ModelInferRequest`); the tensors (fields 5 to 7) are
skipped by their length, never decoded. A rewrite (a version chosen by a traffic split, the
gateway's own `kapi-*` parameters taken out) joins slices of the original bytes.

Wire format: https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kapi.core.errors import InvalidArgument

# Request parameters named so are the gateway's (routing hints); backends never see them.
GATEWAY_PARAMETER_PREFIX = "kapi-"

_MODEL_NAME, _MODEL_VERSION, _PARAMETERS = 1, 2, 4
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_UINT64 = (1 << 64) - 1
_DOUBLE = struct.Struct("<d")

Parameter = bool | int | str | float


@dataclass(slots=True)
class RoutingFields:
    model_name: str = ""
    model_version: str = ""
    parameters: dict[str, Parameter] = field(default_factory=dict)
    # Byte spans (start, end) of the parameters entries the gateway takes out.
    gateway_spans: list[tuple[int, int]] = field(default_factory=list)


class WireError(InvalidArgument):
    """The bytes are not a ModelInferRequest."""


def read_routing(data: bytes) -> RoutingFields:
    """The routing fields of a serialized ModelInferRequest; its tensors are only skipped."""
    fields = RoutingFields()
    position, end = 0, len(data)
    while position < end:
        start = position
        number, kind, position = _key(data, position)
        if kind == _LENGTH:
            length, position = _varint(data, position)
            stop = position + length
            if stop > end:
                raise WireError("the ModelInferRequest message could not be parsed: truncated")
            if number == _MODEL_NAME:
                fields.model_name = _text(data, position, stop, "model_name")
            elif number == _MODEL_VERSION:
                fields.model_version = _text(data, position, stop, "model_version")
            elif number == _PARAMETERS:
                name, value = _parameter_entry(data, position, stop)
                fields.parameters[name] = value
                if name.startswith(GATEWAY_PARAMETER_PREFIX):
                    fields.gateway_spans.append((start, stop))
            position = stop
        else:
            position = _skip(data, position, kind, number, end)
    return fields


def rewrite(data: bytes, fields: RoutingFields, version: str | None) -> bytes:
    """`data` without the gateway's parameters and, when `version` is given, asking for it.

    A singular field that appears twice takes its last value, so the version is appended
    (the client's own field, when there is one, is left where it is: it is overridden)."""
    if not fields.gateway_spans and version is None:
        return data
    parts, position = [], 0
    for start, stop in fields.gateway_spans:
        parts.append(data[position:start])
        position = stop
    parts.append(data[position:])
    if version is not None:
        encoded = version.encode()
        parts.append(bytes([_MODEL_VERSION << 3 | _LENGTH]) + _encode_varint(len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def _parameter_entry(data: bytes, position: int, end: int) -> tuple[str, Parameter]:
    """One map<string, InferParameter> entry: key = 1, value = 2."""
    name, value = "", None
    while position < end:
        number, kind, position = _key(data, position)
        if kind != _LENGTH:
            position = _skip(data, position, kind, number, end)
            continue
        length, position = _varint(data, position)
        stop = position + length
        if stop > end:
            raise WireError("the ModelInferRequest message could not be parsed: truncated")
        if number == 1:
            name = _text(data, position, stop, "parameter name")
        elif number == 2:
            value = _infer_parameter(data, position, stop)
        position = stop
    return name, value if value is not None else ""


def _infer_parameter(data: bytes, position: int, end: int) -> Parameter:
    """InferParameter's oneof: bool = 1, int64 = 2, string = 3, double = 4, uint64 = 5."""
    value: Parameter = ""
    while position < end:
        number, kind, position = _key(data, position)
        if kind == _VARINT:
            raw, position = _varint(data, position)
            if number == 1:
                value = raw != 0
            elif number == 2:
                value = raw - (1 << 64) if raw >= 1 << 63 else raw
            elif number == 5:
                value = raw
        elif kind == _FIXED64 and number == 4:
            if position + 8 > end:
                raise WireError("the ModelInferRequest message could not be parsed: truncated")
            value = _DOUBLE.unpack_from(data, position)[0]
            position += 8
        elif kind == _LENGTH:
            length, position = _varint(data, position)
            if position + length > end:
                raise WireError("the ModelInferRequest message could not be parsed: truncated")
            if number == 3:
                value = _text(data, position, position + length, "string_param")
            position += length
        else:
            position = _skip(data, position, kind, number, end)
    return value


def _text(data: bytes, start: int, stop: int, what: str) -> str:
    try:
        return data[start:stop].decode()
    except UnicodeDecodeError:
        raise WireError(f"the ModelInferRequest's {what} is not UTF-8") from None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    try:
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result & _UINT64, position  # as protobuf reads an over-long one
            shift += 7
            if shift > 63:
                raise WireError("the ModelInferRequest message could not be parsed: bad varint")
    except IndexError:
        raise WireError("the ModelInferRequest message could not be parsed: truncated") from None


def _key(data: bytes, position: int) -> tuple[int, int, int]:
    """A field's (number, wire type) and where its value starts."""
    key, position = _varint(data, position)
    if key >> 3 == 0:
        raise WireError("the ModelInferRequest message could not be parsed: field number 0")
    return key >> 3, key & 7, position


def _skip(data: bytes, position: int, kind: int, number: int, end: int) -> int:
    """Past one field's value, which must end by `end`; a group up to its end-group."""
    if kind == _VARINT:
        position = _varint(data, position)[1]
    elif kind == _FIXED64:
        position += 8
    elif kind == _FIXED32:
        position += 4
    elif kind == _LENGTH:
        length, position = _varint(data, position)
        position += length
    elif kind == _START_GROUP:
        while True:
            if position >= end:
                raise WireError("the ModelInferRequest message could not be parsed: truncated")
            inner, inner_kind, position = _key(data, position)
            if inner_kind == _END_GROUP:
                if inner != number:
                    raise WireError(
                        "the ModelInferRequest message could not be parsed: mismatched group"
                    )
                break
            position = _skip(data, position, inner_kind, inner, end)
    else:
        raise WireError(f"the ModelInferRequest message could not be parsed: wire type {kind}")
    if position > end:
        raise WireError("the ModelInferRequest message could not be parsed: truncated")
    return position


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
