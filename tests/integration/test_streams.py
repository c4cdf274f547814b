"""ModelStreamInfer as Triton serves a model that is not decoupled: responses in request
order, whatever order the requests finish in, while requests on one stream still batch."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests.support import models
from tests.support.clients import infer_input
from tests.support.node import NodeFactory, RunningNode

Outcome = tuple[grpcclient.InferResult | None, object]
BATCHING = """
max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 200000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def add_input(value: float) -> list[grpcclient.InferInput]:
    return [infer_input("INPUT0", np.full((1, 4), value, dtype=np.float32), "FP32")]


def stream(node: RunningNode, requests: list[tuple[str, list[grpcclient.InferInput]]]) -> list[
    Outcome
]:  # fmt: skip
    """Send `requests` (model, inputs) back to back on one stream; the outcomes in the
    order they arrived, each request's id its index."""
    outcomes: queue.Queue[Outcome] = queue.Queue()
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
        for index, (model, inputs) in enumerate(requests):
            client.async_stream_infer(model, inputs, request_id=str(index))
        client.stop_stream()  # waits for every response
    return [outcomes.get_nowait() for _ in range(outcomes.qsize())]


def ids(outcomes: list[Outcome]) -> list[str]:
    return [result.get_response().id for result, _ in outcomes if result is not None]


def test_a_slow_request_is_answered_before_the_fast_ones_sent_after_it(
    main_node: RunningNode,
) -> None:
    """`held` keeps a lone request for 1 s waiting for company; `identity_wide` answers at
    once. Triton answers in request order, so kapi does too."""
    requests = [("held", add_input(1.0)), *(("identity_wide", add_input(i)) for i in range(5))]

    outcomes = stream(main_node, requests)

    assert [error for _, error in outcomes] == [None] * 6
    assert ids(outcomes) == [str(index) for index in range(6)]
    first = outcomes[0][0]
    assert first is not None
    np.testing.assert_array_equal(first.as_numpy("OUTPUT0"), np.full((1, 4), 2.0))


def test_requests_on_one_stream_batch_together(
    tmp_path: Path, start_kapi_node: NodeFactory
) -> None:
    models.save_model(tmp_path, "batching", models.add_constant_model(0.5), config=BATCHING)
    node = start_kapi_node(tmp_path)

    outcomes = stream(node, [("batching", add_input(float(i))) for i in range(10)])

    assert ids(outcomes) == [str(index) for index in range(10)]
    for index, (result, _) in enumerate(outcomes):
        assert result is not None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), index + 0.5))
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        (stats,) = client.get_inference_statistics("batching").model_stats
    assert stats.inference_count == 10
    assert stats.execution_count < 10


def test_many_requests_on_one_stream_are_all_answered_in_order(main_node: RunningNode) -> None:
    """More requests than a stream may have in flight at once: the node reads the rest as
    it answers, and nothing is lost or reordered."""
    requests = [("identity_wide", add_input(float(i))) for i in range(300)]

    outcomes = stream(main_node, requests)

    assert ids(outcomes) == [str(index) for index in range(300)]
    for index, (result, _) in enumerate(outcomes):
        assert result is not None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), float(index)))
