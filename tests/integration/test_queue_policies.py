"""Request priorities and timeouts, on both transports, as Triton's queue policies take
them: a request that may not wait as long as its batch would is refused once its timeout
passes; priorities pick a level, and are accepted where a model has none."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support.clients import expect_error, simple_inputs
from tests.support.node import RunningNode


def add_input(module: type, rows: int = 1) -> object:
    tensor = module.InferInput("INPUT0", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((rows, 4), dtype=np.float32))
    return tensor


def test_a_request_whose_timeout_passes_while_it_waits_is_unavailable(
    client: grpcclient.InferenceServerClient,
) -> None:
    """The batch would wait a minute for company; the request allows 100 ms."""
    expect_error(
        lambda: client.infer("queued", [add_input(grpcclient)], timeout=100_000, client_timeout=30),
        "StatusCode.UNAVAILABLE",
        "Request timeout expired",
    )


def test_the_timeout_over_rest(main_node: RunningNode) -> None:
    url = main_node.http_url.removeprefix("http://")
    with (
        httpclient.InferenceServerClient(url, network_timeout=30) as rest,
        pytest.raises(InferenceServerException) as raised,
    ):
        rest.infer("queued", [add_input(httpclient)], timeout=100_000)
    assert raised.value.status() == "503"
    assert "Request timeout expired" in raised.value.message()


def test_a_full_batch_at_the_high_priority_level_runs(
    client: grpcclient.InferenceServerClient,
) -> None:
    result = client.infer("queued", [add_input(grpcclient, rows=8)], priority=1, client_timeout=30)

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.ones((8, 4), dtype=np.float32))


def test_priority_and_timeout_are_accepted_by_a_model_without_a_queue_policy(
    client: grpcclient.InferenceServerClient,
) -> None:
    """As in Triton: without priority levels the priority is the default one, and without a
    policy that allows it the timeout changes nothing."""
    result = client.infer("simple", simple_inputs(), priority=5, timeout=1)

    assert result.as_numpy("OUTPUT0") is not None
