"""Triton's classification extension on both transports: a requested output with a class
count comes back as its top classes, "<value>:<index>[:<label>]", with the labels of the
output's label file."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.clients import expect_error, expect_rpc_error
from tests.support.node import RunningNode

SCORES = np.array([[0.1, 0.7, 0.05, 0.9, 0.3], [5.0, -1.0, 2.5, 2.5, 0.0]], dtype=np.float32)
# Row by row, highest first; equal values in index order; class 4 has no label.
TOP3 = [
    [b"0.900000:3:fish", b"0.700000:1:dog", b"0.300000:4"],
    [b"5.000000:0:cat", b"2.500000:2:bird", b"2.500000:3:fish"],
]


@pytest.fixture(scope="module")
def rest(main_node: RunningNode) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(main_node.http_url.removeprefix("http://")) as client:
        yield client


def scores_input(module: type) -> object:
    tensor = module.InferInput("INPUT0", list(SCORES.shape), "FP32")
    tensor.set_data_from_numpy(SCORES)
    return tensor


def test_grpc_classification_returns_the_top_classes_with_labels(
    client: grpcclient.InferenceServerClient,
) -> None:
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)]
    result = client.infer("classifier", [scores_input(grpcclient)], outputs=outputs)

    (output,) = result.get_response().outputs
    assert (output.datatype, list(output.shape)) == ("BYTES", [2, 3])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.array(TOP3, dtype=object))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_rest_classification_returns_the_top_classes(
    rest: httpclient.InferenceServerClient, binary: bool
) -> None:
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=3)]
    result = rest.infer("classifier", [scores_input(httpclient)], outputs=outputs)

    got = result.as_numpy("OUTPUT0")
    expected = np.array(TOP3, dtype=object)
    if not binary:
        expected = np.vectorize(lambda value: value.decode(), otypes=[object])(expected)
    np.testing.assert_array_equal(got, expected)


def test_a_class_count_past_the_classes_returns_them_all(
    client: grpcclient.InferenceServerClient,
) -> None:
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=50)]
    result = client.infer("classifier", [scores_input(grpcclient)], outputs=outputs)

    assert result.as_numpy("OUTPUT0").shape == (2, 5)


def test_a_model_that_does_not_batch_is_classified_as_one_tensor(
    client: grpcclient.InferenceServerClient,
) -> None:
    data = np.array([[3, 9, 1], [7, 2, 8]], dtype=np.int32)
    tensor = grpcclient.InferInput("INPUT0", [2, 3], "INT32")
    tensor.set_data_from_numpy(data)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)]
    result = client.infer("classifier_unbatched", [tensor], outputs=outputs)

    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), np.array([b"9:1", b"8:5"], dtype=object)
    )


def test_outputs_not_asked_for_classes_come_back_as_tensors(
    client: grpcclient.InferenceServerClient,
) -> None:
    result = client.infer("classifier", [scores_input(grpcclient)])

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), SCORES)


def test_a_type_triton_cannot_classify_is_refused_in_its_words(
    client: grpcclient.InferenceServerClient,
) -> None:
    data = np.zeros((1, 4), dtype=np.float16)
    tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP16")
    tensor.set_data_from_numpy(data)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=1)]
    expect_error(
        lambda: client.infer("identity_fp16", [tensor], outputs=outputs),
        "StatusCode.INVALID_ARGUMENT",
        "class result not available for output 'OUTPUT0' due to unsupported type 'FP16'",
    )


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("int64_param", 0, "invalid value for 'classification' parameter, expected >= 0"),
        ("int64_param", -2, "invalid value for 'classification' parameter"),
        ("bool_param", True, "invalid value type for 'classification' parameter"),
        ("string_param", "3", "invalid value type for 'classification' parameter"),
    ],
)
def test_a_bad_class_count_is_invalid(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, field: str, value: object, words: str
) -> None:
    request = service_pb2.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(SCORES.shape))
    request.raw_input_contents.append(SCORES.tobytes())
    setattr(request.outputs.add(name="OUTPUT0").parameters["classification"], field, value)

    expect_rpc_error(
        lambda: stub.ModelInfer(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, words
    )


def test_server_metadata_lists_the_extension(client: grpcclient.InferenceServerClient) -> None:
    assert "classification" in client.get_server_metadata().extensions
