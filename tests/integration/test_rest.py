"""The KServe v2 REST API on the node's HTTP port, with Triton's own HTTP client (sync and
asyncio), the KServe SDK's REST client and curl: metadata, config, statistics, inference with
JSON and binary tensors, compression, and errors as Triton words and codes them."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from ml_dtypes import bfloat16
from tritonclient.utils import InferenceServerException

from tests.integration.test_datatypes import sample
from tests.support.models import DATATYPES
from tests.support.node import RunningNode

HEADER_LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def rest(main_node: RunningNode) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(main_node.http_url.removeprefix("http://")) as client:
        yield client


def simple_inputs(binary: bool = True, batch: int = 1) -> list[httpclient.InferInput]:
    """INPUT0 = 0..15, INPUT1 = all ones, for the `simple` add/sub model."""
    first = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    second = np.ones((batch, 16), dtype=np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [batch, 16], "INT32"),
        httpclient.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(first, binary_data=binary)
    inputs[1].set_data_from_numpy(second, binary_data=binary)
    return inputs


def check_simple(result: Any, batch: int = 1) -> None:
    first = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), first + 1, strict=True)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), first - 1, strict=True)


def expect_http_error(call: Any, status: int, *words: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()
    assert raised.value.status() == str(status), raised.value.message()
    for word in words:
        assert word in raised.value.message()
    return raised.value


def post(node: RunningNode, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(node.http_url + path, content=body, headers=headers, timeout=30)


# Metadata, config, statistics, readiness.


def test_server_metadata_and_health(rest: httpclient.InferenceServerClient) -> None:
    assert rest.is_server_live()
    assert rest.is_server_ready()
    metadata = rest.get_server_metadata()
    assert metadata["name"] == "kapi"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_and_readiness(rest: httpclient.InferenceServerClient) -> None:
    metadata = rest.get_model_metadata("simple")

    assert metadata["name"] == "simple"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [
        {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ]
    assert rest.is_model_ready("simple")
    assert rest.is_model_ready("triton_latest", "3")
    assert not rest.is_model_ready("triton_latest", "1")
    assert not rest.is_model_ready("no_such_model")


def test_model_config_is_json_with_numbers_as_triton_renders_it(
    rest: httpclient.InferenceServerClient,
) -> None:
    config = rest.get_model_config("triton_all")

    assert config["name"] == "triton_all"
    assert config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [4]  # int64 in the proto: a number, not "4"
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["intra_op_thread_count"] == {"string_value": "1"}
    assert config["version_policy"] == {"all": {}}


def test_model_statistics_count_rest_requests(rest: httpclient.InferenceServerClient) -> None:
    before = rest.get_inference_statistics("counted")["model_stats"][0]
    data = np.ones((1, 4), dtype=np.float32)
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(data)
    for _ in range(3):
        rest.infer("counted", [tensor])

    after = rest.get_inference_statistics("counted", "1")["model_stats"]
    assert [(entry["name"], entry["version"]) for entry in after] == [("counted", "1")]
    success = after[0]["inference_stats"]["success"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 3
    assert isinstance(success["ns"], int)
    everything = rest.get_inference_statistics()["model_stats"]
    assert {"counted", "simple"} <= {entry["name"] for entry in everything}


def test_repository_index_lists_models_and_versions(
    rest: httpclient.InferenceServerClient,
) -> None:
    index = rest.get_model_repository_index()

    rows = {(row["name"], row.get("version")): row for row in index}
    assert rows[("triton_all", "1")]["state"] == "READY"
    assert rows[("triton_all", "3")]["state"] == "READY"
    assert "reason" not in rows[("simple", "1")]


# Inference.


def test_binary_inputs_and_outputs(rest: httpclient.InferenceServerClient) -> None:
    result = rest.infer("simple", simple_inputs(binary=True, batch=3), request_id="r-1")

    check_simple(result, batch=3)
    response = result.get_response()
    assert response["id"] == "r-1"
    assert response["model_name"] == "simple"
    assert response["model_version"] == "1"
    assert all("binary_data_size" in output["parameters"] for output in response["outputs"])


def test_json_inputs_and_outputs(rest: httpclient.InferenceServerClient) -> None:
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=False),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]
    result = rest.infer("simple", simple_inputs(binary=False), outputs=outputs)

    check_simple(result)
    assert all("data" in output for output in result.get_response()["outputs"])


def test_only_the_requested_outputs_come_back(rest: httpclient.InferenceServerClient) -> None:
    result = rest.infer(
        "simple", simple_inputs(), outputs=[httpclient.InferRequestedOutput("OUTPUT1")]
    )

    assert [output["name"] for output in result.get_response()["outputs"]] == ["OUTPUT1"]


def test_a_listed_output_without_binary_data_is_json_even_with_binary_data_output(
    main_node: RunningNode,
) -> None:
    """As Triton: binary_data_output only sets the kind of the outputs not listed."""
    body = {
        "inputs": [
            {"name": name, "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}
            for name in ("INPUT0", "INPUT1")
        ],
        "outputs": [{"name": "OUTPUT0"}],
        "parameters": {"binary_data_output": True},
    }
    response = post(main_node, "/v2/models/simple/infer", json.dumps(body).encode())

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    assert output["data"] == [2] * 16


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "FP16"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(
    rest: httpclient.InferenceServerClient, datatype: str, binary: bool
) -> None:
    data = sample(datatype)
    tensor = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = rest.infer(f"identity_{datatype.lower()}", [tensor], outputs=[output])

    got = result.as_numpy("OUTPUT0")
    if datatype == "BYTES" and not binary:  # JSON strings come back as str
        data = np.vectorize(lambda value: value.decode(), otypes=[object])(data)
    np.testing.assert_array_equal(got, data, strict=True)


@pytest.mark.parametrize(("datatype", "dtype"), [("FP16", np.float16), ("BF16", bfloat16)])
def test_fp16_and_bf16_travel_as_binary_only(
    rest: httpclient.InferenceServerClient, main_node: RunningNode, datatype: str, dtype: Any
) -> None:
    data = np.array([[1.5, -2.0, 0.25, 65504.0]], dtype=dtype)
    tensor = httpclient.InferInput("INPUT0", [1, 4], datatype)
    tensor.set_data_from_numpy(data)
    model = f"identity_{datatype.lower()}"
    result = rest.infer(model, [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0").view(dtype), data)

    as_json = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)
    expect_http_error(
        lambda: rest.infer(model, [tensor], outputs=[as_json]),
        400,
        f"sending {datatype} data via JSON is not supported",
    )
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": datatype, "data": [1] * 4}]}
    response = post(main_node, f"/v2/models/{model}/infer", json.dumps(body).encode())
    assert response.status_code == 400
    assert response.json()["error"].startswith(
        f"receiving {datatype} data via JSON is not supported. Please use the binary data "
        "format for input INPUT0"
    )


def test_nested_json_data_is_read_row_major(main_node: RunningNode) -> None:
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [2, 16], "datatype": "INT32", "data": [[1] * 16, [2] * 16]},
            {"name": "INPUT1", "shape": [2, 16], "datatype": "INT32", "data": [1] * 32},
        ]
    }
    response = post(main_node, "/v2/models/simple/infer", json.dumps(body).encode())

    assert response.status_code == 200, response.text
    first, second = response.json()["outputs"]
    assert first["shape"] == [2, 16]
    assert first["data"] == [2] * 16 + [3] * 16
    assert second["data"] == [0] * 16 + [1] * 16


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(
    rest: httpclient.InferenceServerClient, main_node: RunningNode, algorithm: str
) -> None:
    result = rest.infer(
        "simple",
        simple_inputs(batch=2),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    check_simple(result, batch=2)

    # On the wire: the response is compressed as asked, its header length uncompressed.
    body = {
        "inputs": [
            {"name": name, "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}
            for name in ("INPUT0", "INPUT1")
        ],
        "parameters": {"binary_data_output": True},
    }
    raw = json.dumps(body).encode()
    packed = gzip.compress(raw) if algorithm == "gzip" else zlib.compress(raw)
    response = httpx.post(
        main_node.http_url + "/v2/models/simple/infer",
        content=packed,
        headers={"Content-Encoding": algorithm, "Accept-Encoding": algorithm},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["content-encoding"] == algorithm
    assert response.headers["content-type"] == "application/octet-stream"
    decoded = response.content  # httpx has undone the encoding
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(decoded[:length])
    assert [output["parameters"]["binary_data_size"] for output in header["outputs"]] == [64, 64]
    assert len(decoded) == length + 128


async def test_the_asyncio_client(main_node: RunningNode) -> None:
    url = main_node.http_url.removeprefix("http://")
    async with aiohttpclient.InferenceServerClient(url) as client:
        assert await client.is_server_ready()
        metadata = await client.get_model_metadata("simple")
        assert metadata["name"] == "simple"
        inputs = simple_inputs(batch=2)
        result = await client.infer("simple", inputs, request_id="aio")

    check_simple(result, batch=2)
    assert result.get_response()["id"] == "aio"


# The KServe SDK registers the OIP protos under the names tritonclient's use, so the two
# cannot share a process: its client runs in one of its own.
KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

async def main(url):
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    first = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = []
    for name, data in (("INPUT0", first), ("INPUT1", np.ones((1, 16), dtype=np.int32))):
        tensor = InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(data, binary_data=sys.argv[2] == "binary")
        inputs.append(tensor)
    try:
        request = InferRequest("simple", inputs, request_id="k-1")
        response = await client.infer(url, request, model_name="simple")
    finally:
        await client.close()
    outputs = {o.name: o.as_numpy().tolist() for o in response.outputs}
    print(json.dumps({"id": response.id, "model": response.model_name, "outputs": outputs}))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_the_kserve_sdk_rest_client(main_node: RunningNode, encoding: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", KSERVE_CLIENT, main_node.http_url, encoding],
        check=True, capture_output=True, timeout=120,
    ).stdout  # fmt: skip

    response = json.loads(out)
    assert response["id"] == "k-1"
    assert response["model"] == "simple"
    first = np.arange(16, dtype=np.int32).reshape(1, 16)
    assert response["outputs"] == {
        "OUTPUT0": (first + 1).tolist(),
        "OUTPUT1": (first - 1).tolist(),
    }


def test_curl_with_json(main_node: RunningNode) -> None:
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
        ]
    }
    out = subprocess.run(
        ["curl", "-sf", "-X", "POST", "-H", "Content-Type: application/json", "-d",
         json.dumps(body), f"{main_node.http_url}/v2/models/simple/infer"],
        check=True, capture_output=True, timeout=30,
    ).stdout  # fmt: skip

    first, second = json.loads(out)["outputs"]
    assert first == {
        "name": "OUTPUT0",
        "datatype": "INT32",
        "shape": [1, 16],
        "data": list(range(1, 17)),
    }
    assert second["data"] == list(range(-1, 15))


def binary_request(
    inputs: list[tuple[str, npt.NDArray[Any], str]], extra: bytes = b"", cut: int = 0
) -> tuple[bytes, int]:
    """A request body in Triton's binary extension, as tritonclient builds it."""
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(data.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": data.nbytes},
            }
            for name, data, datatype in inputs
        ]
    }
    encoded = json.dumps(header).encode()
    blobs = b"".join(data.tobytes() for _, data, _ in inputs) + extra
    return encoded + blobs[: len(blobs) - cut], len(encoded)


def simple_binary(extra: bytes = b"", cut: int = 0) -> tuple[bytes, int]:
    ones = np.ones((1, 16), dtype=np.int32)
    return binary_request([("INPUT0", ones, "INT32"), ("INPUT1", ones, "INT32")], extra, cut)


# Errors, in Triton's words and with its status codes.


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    message: str = response.json()["error"]
    return message


def test_unknown_model_and_version(rest: httpclient.InferenceServerClient) -> None:
    expect_http_error(
        lambda: rest.infer("no_such_model", simple_inputs()),
        404,
        "Request for unknown model: 'no_such_model' is not found",
    )
    expect_http_error(
        lambda: rest.infer("simple", simple_inputs(), model_version="7"),
        404,
        "Request for unknown model: 'simple' version 7 is not found",
    )
    expect_http_error(lambda: rest.get_model_metadata("no_such_model"), 404, "'no_such_model'")


def test_unknown_paths_and_methods(main_node: RunningNode) -> None:
    missing = httpx.get(main_node.http_url + "/v2/nothing/here", timeout=10)
    assert (missing.status_code, error_of(missing)) == (404, "Not Found")
    wrong = httpx.delete(main_node.http_url + "/v2/models/simple", timeout=10)
    assert (wrong.status_code, error_of(wrong)) == (405, "Method Not Allowed")
    get_infer = httpx.get(main_node.http_url + "/v2/models/simple/infer", timeout=10)
    assert get_infer.status_code == 405


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "failed to parse the request JSON buffer"),
        (b"[]", "an object with 'inputs'"),
        (b'{"outputs": []}', "Unable to parse 'inputs'"),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32"}]}',
            "Input must set only one of the following fields: 'data', 'binary_data_size' in "
            "'parameters', 'shared_memory_region' in 'parameters'. But no field is set",
        ),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32",'
            b' "data": [1, 2]}]}',
            "Unable to parse 'data': Shape does not match true shape of 'data' field",
        ),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32",'
            b' "data": [1.5, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}]}',
            "expected integers, got numbers",
        ),
        (
            b'{"inputs": [{"name": "INPUT0", "shape": [1, -16], "datatype": "INT32",'
            b' "data": [1]}]}',
            "negative dimension",
        ),
        (b'{"inputs": [], "parameters": {"p": [1]}}', "parameter 'p' has invalid type"),
    ],
)
def test_malformed_requests_are_400_with_the_reason(
    main_node: RunningNode, body: bytes, words: str
) -> None:
    response = post(main_node, "/v2/models/simple/infer", body)

    assert response.status_code == 400
    assert words in error_of(response)


def test_bytes_elements_are_counted_in_tritons_words(main_node: RunningNode) -> None:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "BYTES", "data": ["a"]}]}
    response = post(main_node, "/v2/models/identity_bytes/infer", json.dumps(body).encode())

    assert response.status_code == 400
    assert error_of(response).startswith(
        "expected 4 string elements for inference input 'INPUT0' for model 'identity_bytes', got 1"
    )


def test_binary_data_sizes_must_match_the_body(main_node: RunningNode) -> None:
    path = "/v2/models/simple/infer"
    body, length = simple_binary()
    assert post(main_node, path, body, **{HEADER_LENGTH: str(length)}).status_code == 200

    body, length = simple_binary(extra=b"\x00")
    response = post(main_node, path, body, **{HEADER_LENGTH: str(length)})
    assert response.status_code == 400
    assert error_of(response) == "unexpected additional input data for model 'simple'"

    body, length = simple_binary(cut=3)
    response = post(main_node, path, body, **{HEADER_LENGTH: str(length)})
    assert response.status_code == 400
    assert error_of(response).startswith(
        "unexpected size for input 'INPUT1', expecting 3 additional bytes for model 'simple'"
    )

    response = post(main_node, path, body, **{HEADER_LENGTH: str(len(body) + 1)})
    assert response.status_code == 400
    assert error_of(response).startswith(
        f"inference header size should be in range (0, {len(body)}), got: {len(body) + 1}"
    )


def test_an_unsupported_content_encoding_is_501_naming_what_is(main_node: RunningNode) -> None:
    response = post(main_node, "/v2/models/simple/infer", b"{}", **{"Content-Encoding": "br"})

    assert response.status_code == 501
    assert "Unsupported compression type" in error_of(response)
    assert response.headers["accept-encoding"] == "gzip, deflate"


def test_a_corrupt_compressed_body_is_400(main_node: RunningNode) -> None:
    response = post(
        main_node, "/v2/models/simple/infer", b"not gzip", **{"Content-Encoding": "gzip"}
    )

    assert response.status_code == 400
    assert "could not be decompressed" in error_of(response)


def test_model_control_is_refused_without_explicit_mode(
    rest: httpclient.InferenceServerClient,
) -> None:
    expect_http_error(lambda: rest.load_model("simple"), 400, "explicit model load / unload")


def test_unsupported_extensions_are_501(rest: httpclient.InferenceServerClient) -> None:
    expect_http_error(rest.get_cuda_shared_memory_status, 501, "CUDA shared memory")
    expect_http_error(rest.get_trace_settings, 501, "tracing")
