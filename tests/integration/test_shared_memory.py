"""System shared memory, as Triton's extension and tritonclient's shared_memory utilities
use it: tensors pass through POSIX shared memory regions on both transports, and every
misuse is an error in Triton's words."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from tests.support.clients import expect_error
from tests.support.node import RunningNode

ROW = 16 * 4  # one row of the `simple` model: 16 INT32


@pytest.fixture
def regions(client: grpcclient.InferenceServerClient) -> Iterator[dict[str, Any]]:
    """An input region holding both inputs, an output region for both outputs."""
    tag = uuid.uuid4().hex[:8]
    handles = {
        "input": shm.create_shared_memory_region(f"in-{tag}", f"/kapi-in-{tag}", 2 * ROW),
        "output": shm.create_shared_memory_region(f"out-{tag}", f"/kapi-out-{tag}", 2 * ROW),
    }
    first = np.arange(16, dtype=np.int32).reshape(1, 16)
    second = np.full((1, 16), 3, dtype=np.int32)
    shm.set_shared_memory_region(handles["input"], [first, second])
    names = {"input": f"in-{tag}", "output": f"out-{tag}"}
    client.register_system_shared_memory(names["input"], f"/kapi-in-{tag}", 2 * ROW)
    client.register_system_shared_memory(names["output"], f"/kapi-out-{tag}", 2 * ROW)
    try:
        yield {"names": names, "handles": handles, "first": first, "second": second}
    finally:
        client.unregister_system_shared_memory(names["input"])
        client.unregister_system_shared_memory(names["output"])
        for handle in handles.values():
            shm.destroy_shared_memory_region(handle)


def shm_request(module: Any, names: dict[str, str]) -> tuple[list[Any], list[Any]]:
    inputs = [module.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory(names["input"], ROW)
    inputs[1].set_shared_memory(names["input"], ROW, offset=ROW)
    outputs = [module.InferRequestedOutput(name) for name in ("OUTPUT0", "OUTPUT1")]
    outputs[0].set_shared_memory(names["output"], ROW)
    outputs[1].set_shared_memory(names["output"], ROW, offset=ROW)
    return inputs, outputs


def read_outputs(regions: dict[str, Any]) -> tuple[Any, Any]:
    handle = regions["handles"]["output"]
    total = shm.get_contents_as_numpy(handle, np.int32, [2, 16])
    return total[0:1], total[1:2]


def test_inputs_and_outputs_in_shared_memory_over_grpc(
    client: grpcclient.InferenceServerClient, regions: dict[str, Any]
) -> None:
    inputs, outputs = shm_request(grpcclient, regions["names"])
    result = client.infer("simple", inputs, outputs=outputs)

    total, difference = read_outputs(regions)
    np.testing.assert_array_equal(total, regions["first"] + regions["second"])
    np.testing.assert_array_equal(difference, regions["first"] - regions["second"])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert list(response.raw_output_contents) == [b"", b""]  # the data is in the region


def test_inputs_and_outputs_in_shared_memory_over_rest(
    main_node: RunningNode, regions: dict[str, Any]
) -> None:
    url = main_node.http_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as rest:
        status = rest.get_system_shared_memory_status(regions["names"]["input"])
        assert status == [
            {"name": regions["names"]["input"], "key": status[0]["key"], "offset": 0,
             "byte_size": 2 * ROW}
        ]  # fmt: skip
        inputs, outputs = shm_request(httpclient, regions["names"])
        result = rest.infer("simple", inputs, outputs=outputs)

    total, _ = read_outputs(regions)
    np.testing.assert_array_equal(total, regions["first"] + regions["second"])
    for output in result.get_response()["outputs"]:
        assert "data" not in output
        assert "binary_data_size" not in output.get("parameters", {})


def test_a_shared_memory_input_beside_a_raw_one(
    client: grpcclient.InferenceServerClient, regions: dict[str, Any]
) -> None:
    """Raw contents go to the inputs not in shared memory, in order, as Triton reads them."""
    first = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    first.set_shared_memory(regions["names"]["input"], ROW)
    second = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    second.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    result = client.infer("simple", [first, second])

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), regions["first"] + 1)


def test_status_lists_the_regions(
    client: grpcclient.InferenceServerClient, regions: dict[str, Any]
) -> None:
    status = client.get_system_shared_memory_status().regions
    names = regions["names"]
    assert {names["input"], names["output"]} <= set(status)
    assert status[names["input"]].byte_size == 2 * ROW
    expect_error(
        lambda: client.get_system_shared_memory_status("no-such-region"),
        "StatusCode.NOT_FOUND",
        "Unable to find system shared memory region: 'no-such-region'",
    )


def test_misuse_is_refused_in_tritons_words(
    client: grpcclient.InferenceServerClient, regions: dict[str, Any]
) -> None:
    names = regions["names"]
    expect_error(
        lambda: client.register_system_shared_memory(names["input"], "/whatever", 8),
        "StatusCode.ALREADY_EXISTS",
        f"shared memory region '{names['input']}' already in manager",
    )
    expect_error(
        lambda: client.register_system_shared_memory("other", "/kapi-no-such-key", 8),
        "StatusCode.INTERNAL",
        "Unable to open shared memory region: '/kapi-no-such-key'",
    )
    expect_error(
        lambda: client.register_system_shared_memory(
            "too-big", f"/kapi-in-{names['input'].removeprefix('in-')}", 4 * ROW
        ),
        "StatusCode.INVALID_ARGUMENT",
        "failed to register shared memory region 'too-big': invalid args",
    )

    past = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    past.set_shared_memory(names["input"], ROW, offset=2 * ROW)
    other = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    other.set_shared_memory(names["input"], ROW)
    expect_error(
        lambda: client.infer("simple", [past, other]),
        "StatusCode.INVALID_ARGUMENT",
        f"Invalid offset for shared memory region: '{names['input']}'",
    )
    unknown = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    unknown.set_shared_memory("no-such-region", ROW)
    expect_error(
        lambda: client.infer("simple", [unknown, other]),
        "StatusCode.NOT_FOUND",
        "Unable to find shared memory region: 'no-such-region'",
    )
    small = grpcclient.InferRequestedOutput("OUTPUT0")
    small.set_shared_memory(names["output"], 8)
    inputs, _ = shm_request(grpcclient, names)
    expect_error(
        lambda: client.infer("simple", inputs, outputs=[small]),
        "StatusCode.INTERNAL",
        "shared memory size specified with the request for output 'OUTPUT0' (8 bytes) should "
        f"be at least {ROW} bytes to hold the results",
    )


def test_unregistering_a_region_not_registered_is_ok(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.unregister_system_shared_memory("never-registered")


def test_server_metadata_lists_the_extension(client: grpcclient.InferenceServerClient) -> None:
    assert "system_shared_memory" in client.get_server_metadata().extensions
