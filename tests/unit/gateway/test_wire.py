"""The gateway's wire reader against protobuf itself: what `read_routing` reads from real
serializations of ModelInferRequest, and what protobuf parses back from `rewrite`'s bytes.

Protobuf is the oracle throughout: a message built by concatenating serializations of
partial messages is still one message (last value wins for singular fields, map entries
accumulate), so the reader must agree with protobuf on those too.
"""

from __future__ import annotations

import contextlib
import math
import random
import struct

import pytest
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import InvalidArgument
from kapi.gateway.wire import GATEWAY_PARAMETER_PREFIX, WireError, read_routing, rewrite

Parameter = bool | int | str | float
Request = pb.ModelInferRequest


def set_parameter(parameters: object, name: str, value: Parameter, kind: str = "") -> None:
    """parameters[name] = value, in the InferParameter field its type (or `kind`) says."""
    target = parameters[name]  # type: ignore[index]
    if kind:
        setattr(target, kind, value)
    elif isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


def parameters_of(message: Request) -> dict[str, Parameter]:
    """The request parameters as protobuf parsed them ("" for a value with no kind set)."""
    values: dict[str, Parameter] = {}
    for name, parameter in message.parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[name] = "" if kind is None else getattr(parameter, kind)
    return values


def typed(values: dict[str, Parameter]) -> dict[str, tuple[str, object]]:
    """Values with their types, so True and 1 (or 1 and 1.0) do not compare equal; doubles
    by their bits, so -0.0 and 0.0 differ and a NaN equals itself."""
    out: dict[str, tuple[str, object]] = {}
    for name, value in values.items():
        bits = struct.pack("<d", value) if isinstance(value, float) else value
        out[name] = (type(value).__name__, bits)
    return out


def with_tensor(message: Request, name: str, raw: bytes, datatype: str = "UINT8") -> Request:
    tensor = message.inputs.add(name=name, datatype=datatype, shape=[len(raw)])
    tensor.parameters["binary_data_size"].int64_param = len(raw)
    message.raw_input_contents.append(raw)
    return message


def sample_request() -> Request:
    message = Request(model_name="fashion", model_version="3", id="request-1")
    set_parameter(message.parameters, "kapi-hardware", "gpu,edge")
    set_parameter(message.parameters, "session", "user-17")
    set_parameter(message.parameters, "priority", -3)
    with_tensor(message, "images", bytes(range(256)) * 2)
    message.outputs.add(name="logits")
    return message


def expected_rewrite(message: Request, version: str | None) -> Request:
    """What protobuf should parse from `rewrite`: the version replaced, `kapi-*` gone."""
    expected = Request()
    expected.CopyFrom(message)
    for name in list(expected.parameters):
        if name.startswith(GATEWAY_PARAMETER_PREFIX):
            del expected.parameters[name]
    if version is not None:
        expected.model_version = version
    return expected


def assert_reads_as_protobuf(data: bytes) -> None:
    parsed = Request.FromString(data)
    fields = read_routing(data)
    assert (fields.model_name, fields.model_version) == (parsed.model_name, parsed.model_version)
    assert typed(fields.parameters) == typed(parameters_of(parsed))


def assert_rewrites_as_protobuf(data: bytes, version: str | None) -> bytes:
    parsed = Request.FromString(data)
    rewritten = rewrite(data, read_routing(data), version)
    result = Request.FromString(rewritten)
    assert result == expected_rewrite(parsed, version)
    # Tensors are carried over as the same bytes, never re-encoded.
    assert list(result.raw_input_contents) == list(parsed.raw_input_contents)
    assert [t.SerializeToString() for t in result.inputs] == [
        t.SerializeToString() for t in parsed.inputs
    ]
    return rewritten


# Reading ----------------------------------------------------------------------------------


def test_the_routing_fields_of_a_request_are_read() -> None:
    fields = read_routing(sample_request().SerializeToString())

    assert fields.model_name == "fashion"
    assert fields.model_version == "3"
    assert fields.parameters == {"kapi-hardware": "gpu,edge", "session": "user-17", "priority": -3}
    assert len(fields.gateway_spans) == 1


def test_an_empty_message_has_empty_routing_fields() -> None:
    fields = read_routing(b"")

    assert (fields.model_name, fields.model_version, fields.parameters) == ("", "", {})
    assert fields.gateway_spans == []


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("bool_param", True),
        ("bool_param", False),
        ("int64_param", 0),
        ("int64_param", 1),
        ("int64_param", -1),
        ("int64_param", -(2**40) - 7),
        ("int64_param", -(2**63)),
        ("int64_param", 2**63 - 1),
        ("uint64_param", 0),
        ("uint64_param", 2**63),
        ("uint64_param", 2**63 + 12345),
        ("uint64_param", 2**64 - 1),
        ("double_param", 0.0),
        ("double_param", -0.0),
        ("double_param", 0.1),
        ("double_param", -2.5e-300),
        ("double_param", 1.7976931348623157e308),
        ("double_param", math.inf),
        ("double_param", -math.inf),
        ("double_param", math.nan),
        ("string_param", ""),
        ("string_param", "plain"),
        ("string_param", "résumé · 日本語 · 🚀"),
        ("string_param", "x" * 300),  # a length that takes two varint bytes
    ],
)
def test_every_parameter_kind_is_read_with_its_value_and_type(kind: str, value: Parameter) -> None:
    message = Request(model_name="m")
    set_parameter(message.parameters, "p", value, kind)
    data = message.SerializeToString()

    got = read_routing(data).parameters["p"]

    assert typed({"p": got}) == typed({"p": value})
    assert typed({"p": got}) == typed(parameters_of(Request.FromString(data)))


def test_a_parameter_without_a_value_reads_as_an_empty_string() -> None:
    message = Request(model_name="m")
    message.parameters["unset"].SetInParent()
    data = message.SerializeToString()

    assert read_routing(data).parameters == {"unset": ""}
    assert parameters_of(Request.FromString(data)) == {"unset": ""}


def test_unicode_model_names_and_versions_are_read() -> None:
    data = Request(model_name="modèle-日本", model_version="12").SerializeToString()

    fields = read_routing(data)

    assert (fields.model_name, fields.model_version) == ("modèle-日本", "12")


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 600_000])
def test_tensors_of_any_size_are_skipped_to_the_fields_after_them(size: int) -> None:
    tensors = with_tensor(Request(), "x", random.Random(size).randbytes(size))
    after = Request(model_name="after", model_version="2")
    set_parameter(after.parameters, "kapi-hardware", "edge")
    data = tensors.SerializeToString() + after.SerializeToString()

    fields = read_routing(data)

    assert (fields.model_name, fields.model_version) == ("after", "2")
    assert fields.parameters == {"kapi-hardware": "edge"}
    assert_reads_as_protobuf(data)


def test_fields_in_unusual_order_are_read_as_protobuf_merges_them() -> None:
    first = Request(model_name="stale", model_version="1")
    set_parameter(first.parameters, "session", "old")
    set_parameter(first.parameters, "kapi-hardware", "gpu")
    tensors = with_tensor(Request(), "x", b"\x01" * 1000)
    second = Request(model_name="fresh")
    set_parameter(second.parameters, "session", "new")
    set_parameter(second.parameters, "priority", 2**63 + 1, "uint64_param")
    data = b"".join(
        [
            tensors.SerializeToString(),
            first.SerializeToString(),
            Request(outputs=[Request.InferRequestedOutputTensor(name="y")]).SerializeToString(),
            second.SerializeToString(),
        ]
    )

    fields = read_routing(data)

    assert (fields.model_name, fields.model_version) == ("fresh", "1")
    assert fields.parameters == {"session": "new", "kapi-hardware": "gpu", "priority": 2**63 + 1}
    assert_reads_as_protobuf(data)


def test_a_gateway_parameter_given_twice_is_read_last_and_taken_out_twice() -> None:
    first, second = Request(), Request(model_name="m")
    set_parameter(first.parameters, "kapi-hardware", "gpu")
    set_parameter(second.parameters, "kapi-hardware", "edge")
    data = first.SerializeToString() + second.SerializeToString()

    fields = read_routing(data)

    assert fields.parameters == {"kapi-hardware": "edge"}
    assert len(fields.gateway_spans) == 2
    assert Request.FromString(rewrite(data, fields, None)).parameters.keys() == set()


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = b"".join(
        [
            bytes([15 << 3 | 0]) + b"\xff\xff\xff\xff\x0f",  # varint
            bytes([16 << 3 | 1, 1]) + struct.pack("<d", 1.5),  # fixed64 (a two-byte key)
            bytes([17 << 3 | 2, 1, 3]) + b"abc",  # length-delimited
            bytes([18 << 3 | 5, 1]) + b"\x00\x00\x80\x3f",  # fixed32
        ]
    )
    data = unknown + sample_request().SerializeToString() + unknown
    parsed = Request.FromString(data)
    assert len(UnknownFieldSet(parsed)) == 8  # protobuf keeps them, as unknown fields
    parsed.DiscardUnknownFields()
    assert parsed == sample_request()

    assert_reads_as_protobuf(data)
    assert_rewrites_as_protobuf(data, "9")


def test_the_parameters_of_input_tensors_are_not_request_parameters() -> None:
    message = with_tensor(Request(model_name="m"), "x", b"\x00" * 4)
    message.inputs[0].parameters["kapi-hardware"].string_param = "gpu"
    message.outputs.add(name="y").parameters["kapi-session"].string_param = "s"
    data = message.SerializeToString()

    fields = read_routing(data)

    assert fields.parameters == {}
    assert rewrite(data, fields, None) is data


# Rewriting --------------------------------------------------------------------------------


def test_rewrite_takes_out_exactly_the_gateway_parameters() -> None:
    message = with_tensor(Request(model_name="m", model_version="2"), "x", b"\x07" * 600_000)
    for name, value in [
        ("kapi-hardware", "gpu"),
        ("kapi-session", 42),
        ("kapi-", True),
        ("kapi", "kept: no dash"),
        ("KAPI-upper", "kept: the prefix is lower case"),
        ("not-kapi-x", "kept: only a prefix counts"),
        ("session", -(2**62)),
        ("threshold", 0.25),
    ]:
        set_parameter(message.parameters, name, value)
    data = message.SerializeToString()

    rewritten = assert_rewrites_as_protobuf(data, None)

    assert set(Request.FromString(rewritten).parameters) == {
        "kapi",
        "KAPI-upper",
        "not-kapi-x",
        "session",
        "threshold",
    }
    assert len(rewritten) < len(data)


@pytest.mark.parametrize("original", ["", "2"])
def test_rewrite_asks_for_the_chosen_version(original: str) -> None:
    message = sample_request()
    message.model_version = original
    data = message.SerializeToString()

    rewritten = assert_rewrites_as_protobuf(data, "14")

    assert Request.FromString(rewritten).model_version == "14"
    assert read_routing(rewritten).model_version == "14"


def test_rewrite_of_a_message_in_unusual_order() -> None:
    gateway, rest = Request(), Request(model_name="m")
    set_parameter(gateway.parameters, "kapi-hardware", "rpi5")
    set_parameter(rest.parameters, "session", "s")
    tensors = with_tensor(Request(), "x", b"\x02" * 300)
    data = tensors.SerializeToString() + gateway.SerializeToString() + rest.SerializeToString()

    rewritten = assert_rewrites_as_protobuf(data, "3")

    assert rewritten.startswith(tensors.SerializeToString())


def test_rewrite_with_nothing_to_do_returns_the_very_same_bytes() -> None:
    message = sample_request()
    del message.parameters["kapi-hardware"]
    data = message.SerializeToString()

    assert rewrite(data, read_routing(data), None) is data


def test_rewrite_with_a_version_returns_new_bytes() -> None:
    data = Request(model_name="m").SerializeToString()

    rewritten = rewrite(data, read_routing(data), "1")

    assert rewritten is not data
    assert Request.FromString(rewritten) == Request(model_name="m", model_version="1")


# Malformed input --------------------------------------------------------------------------


def test_a_wire_error_is_an_invalid_argument() -> None:
    assert issubclass(WireError, InvalidArgument)
    with pytest.raises(WireError) as raised:
        read_routing(b"\x0a")
    assert raised.value.grpc_status.name == "INVALID_ARGUMENT"
    assert "ModelInferRequest" in raised.value.message


def test_every_truncation_either_parses_as_protobuf_does_or_raises_wire_error() -> None:
    data = sample_request().SerializeToString()

    for cut in range(len(data)):
        prefix = data[:cut]
        try:
            Request.FromString(prefix)
        except DecodeError:
            with pytest.raises(WireError):
                read_routing(prefix)
        else:  # cut at a field boundary: a shorter, valid message
            assert_reads_as_protobuf(prefix)


def _entry(name: bytes, value: bytes) -> bytes:
    """A parameters map entry (field 4) with raw key and InferParameter bytes."""
    entry = b"\x0a" + bytes([len(name)]) + name + b"\x12" + bytes([len(value)]) + value
    return b"\x22" + bytes([len(entry)]) + entry


GARBAGE = {
    "a key and no length": b"\x0a",
    "a length past the end": b"\x0a\x05ab",
    "a tensor cut short": b"\x3a\x80\x01" + b"\x00" * 100,
    "a varint key cut short": b"\x80",
    "a length varint cut short": b"\x0a\xff",
    "a varint of eleven bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "a fixed64 field cut short": b"\x49\x00\x00\x00",
    "a fixed32 field cut short": b"\x4d\x00\x00",
    "model_name not UTF-8": b"\x0a\x02\xff\xfe",
    "model_version not UTF-8": b"\x12\x01\x80",
    "a parameters entry cut short": b"\x22\x05\x0a\x01p",
    "a parameter name not UTF-8": _entry(b"\xc3", b"\x08\x01"),
    "a string parameter not UTF-8": _entry(b"p", b"\x1a\x02\xc3\x28"),
    "a double parameter cut short": _entry(b"p", b"\x21\x00\x00\x00"),
    "a parameter value past its entry": b"\x22\x05\x0a\x01p\x12\x09\x08\x01",
    "random bytes": bytes(random.Random(7).randbytes(64)),
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_raises_wire_error(data: bytes) -> None:
    with pytest.raises(DecodeError):  # protobuf agrees that it is not a ModelInferRequest
        Request.FromString(data)

    with pytest.raises(WireError):
        read_routing(data)


def test_a_name_that_is_not_utf8_is_named_in_the_error() -> None:
    with pytest.raises(WireError, match="model_name is not UTF-8"):
        read_routing(b"\x0a\x02\xff\xfe")


def test_random_damage_never_raises_anything_but_wire_error() -> None:
    rng = random.Random(11)
    original = sample_request().SerializeToString()
    for _ in range(2_000):
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        with contextlib.suppress(WireError):  # anything else fails the test
            read_routing(bytes(data))


def test_a_field_numbered_zero_is_rejected() -> None:
    data = b"\x00\x00" + Request(model_name="m").SerializeToString()
    with pytest.raises(DecodeError):
        Request.FromString(data)

    with pytest.raises(WireError):
        read_routing(data)


def test_a_string_parameter_that_overruns_its_value_is_rejected() -> None:
    # The string claims 5 bytes; its InferParameter holds 2. The reader takes the next 3
    # from the model_name field after it.
    data = _entry(b"kapi-hardware", b"\x1a\x05ab") + b"\x0a\x03abc"
    with pytest.raises(DecodeError):
        Request.FromString(data)

    with pytest.raises(WireError):
        read_routing(data)


def test_an_unknown_field_that_overruns_its_entry_is_rejected() -> None:
    data = b"\x22\x04\x0a\x01p\x19" + b"\x0a\x08" + b"model-nm"
    with pytest.raises(DecodeError):
        Request.FromString(data)

    with pytest.raises(WireError):
        read_routing(data)


def test_an_overlong_uint64_parameter_reads_as_protobuf_reads_it() -> None:
    data = _entry(b"p", b"\x28" + b"\xff" * 9 + b"\x7f")

    assert_reads_as_protobuf(data)


def test_an_unknown_group_field_is_skipped_as_protobuf_skips_it() -> None:
    group = bytes([20 << 3 | 3, 1]) + b"\x08\x01" + bytes([20 << 3 | 4, 1])
    data = group + Request(model_name="m").SerializeToString()
    assert Request.FromString(data).model_name == "m"

    assert read_routing(data).model_name == "m"


# Property ---------------------------------------------------------------------------------

NAMES = ["kapi-hardware", "kapi-session", "kapi-x", "session", "priority", "sequence_id", "é"]


def random_parameter(rng: random.Random) -> tuple[Parameter, str]:
    kind = rng.choice(["bool_param", "int64_param", "uint64_param", "double_param", "string"])
    if kind == "bool_param":
        return rng.random() < 0.5, kind
    if kind == "int64_param":
        return rng.randint(-(2**63), 2**63 - 1), kind
    if kind == "uint64_param":
        return rng.randint(0, 2**64 - 1), kind
    if kind == "double_param":
        return rng.uniform(-1e12, 1e12), kind
    return "".join(rng.choice("aé日🚀-_,") for _ in range(rng.randint(0, 20))), "string_param"


def random_request(rng: random.Random) -> Request:
    message = Request(
        model_name=rng.choice(["", "m", "fashion", "modèle"]) + str(rng.randint(0, 9)),
        model_version=rng.choice(["", "", "1", "27"]),
        id=rng.choice(["", "request-7"]),
    )
    for _ in range(rng.randint(0, 6)):
        value, kind = random_parameter(rng)
        set_parameter(message.parameters, rng.choice(NAMES), value, kind)
    for index in range(rng.randint(0, 3)):
        size = rng.choice([0, 1, 100, 200, 5_000, 70_000])
        with_tensor(message, f"input-{index}", rng.randbytes(size))
    for index in range(rng.randint(0, 2)):
        message.outputs.add(name=f"output-{index}")
    return message


def random_serialization(message: Request, rng: random.Random) -> bytes:
    """The canonical bytes, or the message cut in pieces (a partial message per field,
    each map entry and each tensor its own) and joined in a random order."""
    if rng.random() < 0.3:
        return message.SerializeToString()
    pieces = [
        Request(model_name=message.model_name),
        Request(model_version=message.model_version),
        Request(id=message.id),
    ]
    for name, parameter in message.parameters.items():
        piece = Request()
        piece.parameters[name].CopyFrom(parameter)
        pieces.append(piece)
    pieces += [Request(inputs=[tensor]) for tensor in message.inputs]
    pieces += [Request(outputs=[tensor]) for tensor in message.outputs]
    pieces += [Request(raw_input_contents=[raw]) for raw in message.raw_input_contents]
    if rng.random() < 0.3:  # an earlier, overridden value
        pieces.insert(0, Request(model_name="overridden", model_version="99"))
    rng.shuffle(pieces)
    return b"".join(piece.SerializeToString() for piece in pieces)


@pytest.mark.parametrize("seed", range(300))
def test_random_messages_read_and_rewrite_as_protobuf_parses_them(seed: int) -> None:
    rng = random.Random(seed)
    data = random_serialization(random_request(rng), rng)

    assert_reads_as_protobuf(data)
    version = rng.choice([None, "1", "42"])
    rewritten = assert_rewrites_as_protobuf(data, version)
    fields = read_routing(data)
    if version is None and not fields.gateway_spans:
        assert rewritten is data
    assert not any(name.startswith("kapi-") for name in read_routing(rewritten).parameters)
