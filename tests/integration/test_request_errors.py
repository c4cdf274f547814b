"""Every way a request can be wrong, and the exact gRPC status and message it gets back."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.clients import expect_error, expect_rpc_error, infer_input, simple_inputs
from tests.support.node import RunningNode


def raw_simple_request(first: bytes, second: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
    request.raw_input_contents.extend([first, second])
    return request


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        lambda: client.infer("no_such_model", simple_inputs()),
        "StatusCode.NOT_FOUND",
        "no_such_model",
    )
    expect_error(lambda: client.get_model_metadata("no_such_model"), "StatusCode.NOT_FOUND")
    expect_error(lambda: client.get_model_config("no_such_model"), "StatusCode.NOT_FOUND")
    assert not client.is_model_ready("no_such_model")


@pytest.mark.parametrize("version", ["7", "0"])
def test_unknown_version_is_not_found(
    client: grpcclient.InferenceServerClient, version: str
) -> None:
    expect_error(
        lambda: client.infer("simple", simple_inputs(), model_version=version),
        "StatusCode.NOT_FOUND",
        "simple",
        version,
    )


@pytest.mark.parametrize(
    "version", ["latest", "\u00b2", "\u0661", "-1", "1abc", "9" * 5000, str(2**63)]
)
def test_a_version_that_is_no_number_is_invalid(
    client: grpcclient.InferenceServerClient, version: str
) -> None:
    """As Triton answers it: a version string must be an integral value. ASCII digits only:
    a superscript two and an Arabic-Indic one pass str.isdigit()."""
    for call in (
        lambda: client.infer("simple", simple_inputs(), model_version=version),
        lambda: client.is_model_ready("simple", version),
        lambda: client.get_model_metadata("simple", version),
    ):
        expect_error(call, "StatusCode.INVALID_ARGUMENT", version[:20], "integral value")


def test_wrong_datatype(client: grpcclient.InferenceServerClient) -> None:
    inputs = simple_inputs()
    inputs[1] = infer_input("INPUT1", np.ones((1, 16), dtype=np.float32), "FP32")

    expect_error(
        lambda: client.infer("simple", inputs),
        "StatusCode.INVALID_ARGUMENT",
        "'INPUT1'",
        "FP32",
        "INT32",
    )


def test_wrong_shape(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        lambda: client.infer("simple", simple_inputs(columns=15)),
        "StatusCode.INVALID_ARGUMENT",
        "'INPUT0'",
        "[1, 15]",
    )


def test_batch_larger_than_max_batch_size(client: grpcclient.InferenceServerClient) -> None:
    max_batch = client.get_model_config("simple").config.max_batch_size

    expect_error(
        lambda: client.infer("simple", simple_inputs(batch=max_batch + 1)),
        "StatusCode.INVALID_ARGUMENT",
        "'INPUT0'",
        str(max_batch),
    )


def test_inputs_that_disagree_on_batch_size(client: grpcclient.InferenceServerClient) -> None:
    inputs = simple_inputs(batch=2)
    inputs[1] = infer_input("INPUT1", np.ones((1, 16), dtype=np.int32), "INT32")

    expect_error(lambda: client.infer("simple", inputs), "StatusCode.INVALID_ARGUMENT", "batch")


def test_missing_input(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        lambda: client.infer("simple", simple_inputs()[:1]),
        "StatusCode.INVALID_ARGUMENT",
        "'INPUT1'",
    )


def test_unknown_input(client: grpcclient.InferenceServerClient) -> None:
    inputs = [*simple_inputs(), infer_input("EXTRA", np.ones((1, 16), np.int32), "INT32")]

    expect_error(lambda: client.infer("simple", inputs), "StatusCode.INVALID_ARGUMENT", "'EXTRA'")


def test_unknown_requested_output(client: grpcclient.InferenceServerClient) -> None:
    outputs = [grpcclient.InferRequestedOutput("NO_OUTPUT")]

    expect_error(
        lambda: client.infer("simple", simple_inputs(), outputs=outputs),
        "StatusCode.INVALID_ARGUMENT",
        "'NO_OUTPUT'",
    )


@pytest.mark.parametrize("length", [0, 60, 68, 128])
def test_raw_contents_of_the_wrong_length(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, length: int
) -> None:
    request = raw_simple_request(bytes(64), bytes(length))

    expect_rpc_error(
        lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT1'", "64"
    )


def test_fewer_raw_contents_than_inputs(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_simple_request(bytes(64), bytes(64))
    del request.raw_input_contents[1]

    expect_rpc_error(
        lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"
    )


def test_unknown_datatype(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_simple_request(bytes(64), bytes(64))
    request.inputs[0].datatype = "FP8"

    expect_rpc_error(
        lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "FP8"
    )


def test_truncated_bytes_element(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4])
    # Three whole elements, then a length prefix that promises more bytes than follow.
    request.raw_input_contents.append(b"\x01\x00\x00\x00a" * 3 + b"\x09\x00\x00\x00abc")

    expect_rpc_error(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'")


def test_typed_contents_out_of_range(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_uint8")
    tensor = request.inputs.add(name="INPUT0", datatype="UINT8", shape=[1, 4])
    tensor.contents.uint_contents.extend([1, 2, 300, 4])

    expect_rpc_error(
        lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "UINT8"
    )


def test_typed_contents_of_the_wrong_count(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_int32")
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 4])
    tensor.contents.int_contents.extend([1, 2, 3])

    expect_rpc_error(
        lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'", "3"
    )


def test_raw_and_typed_contents_together(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_simple_request(bytes(64), bytes(64))
    request.inputs[1].contents.int_contents.extend([1] * 16)

    expect_rpc_error(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT1'")


def test_statistics_of_an_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        lambda: client.get_inference_statistics("no_such_model"),
        "StatusCode.NOT_FOUND",
        "no_such_model",
    )


def test_a_stream_message_that_does_not_decode_ends_the_stream_with_invalid_argument(
    channel: grpc.Channel,
) -> None:
    """A good request is answered; then bytes that are not a ModelInferRequest end the
    stream with INVALID_ARGUMENT instead of leaving it hanging."""
    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda message: message,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )
    good = raw_simple_request(bytes(64), bytes(64)).SerializeToString()
    responses = call(iter([good, b"\xff\xff\xff\xff"]), timeout=30)

    first = next(responses)
    with pytest.raises(grpc.RpcError) as raised:
        next(responses)

    assert first.error_message == ""
    assert first.infer_response.model_name == "simple"
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the stream could not be read" in raised.value.details()


def test_a_message_that_does_not_parse_is_invalid_argument(channel: grpc.Channel) -> None:
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda message: message,
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )
    expect_rpc_error(
        lambda: call(b"\xff\xff\xff\xff", timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ModelInferRequest message could not be parsed",
    )


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [1, 2**40, 2**40, 0]])
def test_a_shape_no_tensor_can_have_is_invalid_argument(
    main_node: RunningNode, stub: service_pb2_grpc.GRPCInferenceServiceStub, shape: list[int]
) -> None:
    """Its element count is 0, so its contents are empty; numpy still cannot make it."""
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"")

    expect_rpc_error(
        lambda: stub.ModelInfer(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'INPUT0'",
        "too large for any tensor",
    )
    assert "Traceback" not in main_node.log()


def _with_parameter(name: str, value: object) -> service_pb2.ModelInferRequest:
    request = raw_simple_request(bytes(64), bytes(64))
    parameter = request.parameters[name]
    field = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}
    setattr(parameter, field[type(value)], value)
    return request


@pytest.mark.parametrize(
    ("name", "value", "feature"),
    [
        ("triton_enable_empty_final_response", True, "decoupled"),
    ],
)
def test_request_parameters_kapi_does_not_honour_are_unimplemented(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, name: str, value: object, feature: str
) -> None:
    """Answered OK and ignored, they would give another answer than the client asked for."""
    expect_rpc_error(
        lambda: stub.ModelInfer(_with_parameter(name, value)),
        grpc.StatusCode.UNIMPLEMENTED,
        f"'{name}'",
        feature,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("priority", 0), ("timeout", 0), ("sequence_id", 0), ("sequence_end", False)],
)
def test_request_parameters_at_their_defaults_ask_for_nothing(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, name: str, value: object
) -> None:
    response = stub.ModelInfer(_with_parameter(name, value))
    assert [output.name for output in response.outputs] == ["OUTPUT0", "OUTPUT1"]


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("priority", "high", ("'priority'", "an int64")),
        ("priority", -1, ("'priority'", "expected value >= 0")),
        ("sequence_start", 1, ("'sequence_start'", "a bool")),
        ("temperature", 0.5, ("'temperature'", "not one kapi knows")),
        ("triton_custom", True, ("'triton_custom'", "not one kapi knows")),
    ],
)
def test_request_parameters_of_the_wrong_type_or_unknown_are_invalid(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    name: str,
    value: object,
    words: tuple[str, ...],
) -> None:
    expect_rpc_error(
        lambda: stub.ModelInfer(_with_parameter(name, value)),
        grpc.StatusCode.INVALID_ARGUMENT,
        *words,
    )


def test_an_unknown_output_parameter_is_invalid(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = raw_simple_request(bytes(64), bytes(64))
    request.outputs.add(name="OUTPUT0").parameters["format"].string_param = "png"
    expect_rpc_error(
        lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'OUTPUT0'", "'format'"
    )


def test_an_output_requested_twice_comes_back_once(
    client: grpcclient.InferenceServerClient,
) -> None:
    """As Triton answers it: the requested outputs are a set."""
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("OUTPUT1", "OUTPUT0", "OUTPUT1")]
    response = client.infer("simple", simple_inputs(), outputs=outputs).get_response()
    assert [output.name for output in response.outputs] == ["OUTPUT1", "OUTPUT0"]
