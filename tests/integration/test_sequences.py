"""Sequence batching for stateful models, as Triton's sequence batcher runs them: the
requests of a sequence carry its id and START/END flags, reach the model with the control
inputs and the implicit state its previous request left, unary or on a stream, over both
transports; sequences batch with each other, and misuse is refused in Triton's words."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient

from tests.support import models
from tests.support.clients import expect_error
from tests.support.node import RunningNode, running_node

IDLE_US = 300_000


def accumulator_config(idle_us: int, strategy: str = "oldest") -> str:
    return f"""
max_batch_size: 8
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [
  {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "CORR" data_type: TYPE_UINT64 dims: [ 1 ] }}
]
sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  {strategy} {{ max_queue_delay_microseconds: 5000 }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
  state [ {{
    input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ]
    initial_state {{ name: "zero" data_type: TYPE_INT32 dims: [ 1 ] zero_data: true }}
  }} ]
}}
"""


@pytest.fixture(scope="module")
def sequence_node(
    tmp_path_factory: pytest.TempPathFactory, node_logs: Path
) -> Iterator[RunningNode]:
    root = tmp_path_factory.mktemp("sequences")
    model = models.accumulator_model()
    models.save_model(root, "accumulate", model, config=accumulator_config(60_000_000))
    models.save_model(root, "direct", model, config=accumulator_config(60_000_000, "direct"))
    models.save_model(root, "forgetful", model, config=accumulator_config(IDLE_US))
    with running_node(root, node_logs) as node:
        yield node


@pytest.fixture(scope="module")
def sequence_client(sequence_node: RunningNode) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(sequence_node.grpc_url) as client:
        yield client


def value(module: Any, number: int) -> Any:
    tensor = module.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[number]], dtype=np.int32))
    return tensor


def step(
    client: grpcclient.InferenceServerClient,
    model: str,
    sequence: int,
    number: int,
    start: bool = False,
    end: bool = False,
) -> tuple[int, int]:
    result = client.infer(
        model, [value(grpcclient, number)], sequence_id=sequence, sequence_start=start,
        sequence_end=end,
    )  # fmt: skip
    return int(result.as_numpy("OUTPUT")[0, 0]), int(result.as_numpy("CORR")[0, 0])


@pytest.mark.parametrize("model", ["accumulate", "direct"])
def test_each_sequence_keeps_its_own_state(
    sequence_client: grpcclient.InferenceServerClient, model: str
) -> None:
    assert step(sequence_client, model, 1001, 5, start=True) == (5, 1001)
    assert step(sequence_client, model, 2002, 100, start=True) == (100, 2002)
    assert step(sequence_client, model, 1001, 2) == (7, 1001)
    assert step(sequence_client, model, 2002, 1) == (101, 2002)
    assert step(sequence_client, model, 1001, 3, end=True) == (10, 1001)
    # A new START begins again from the initial state.
    assert step(sequence_client, model, 1001, 4, start=True, end=True) == (4, 1001)


def test_a_request_of_a_sequence_not_in_progress_needs_start(
    sequence_client: grpcclient.InferenceServerClient,
) -> None:
    expect_error(
        lambda: step(sequence_client, "accumulate", 777, 1),
        "StatusCode.INVALID_ARGUMENT",
        "inference request for sequence 777 to model 'accumulate' must specify the START flag "
        "on the first request of the sequence",
    )
    step(sequence_client, "accumulate", 778, 1, start=True, end=True)
    expect_error(  # ended: no longer in progress
        lambda: step(sequence_client, "accumulate", 778, 1),
        "StatusCode.INVALID_ARGUMENT",
        "must specify the START flag",
    )


def test_a_sequence_model_needs_a_correlation_id(
    sequence_client: grpcclient.InferenceServerClient,
) -> None:
    expect_error(
        lambda: sequence_client.infer("accumulate", [value(grpcclient, 1)]),
        "StatusCode.INVALID_ARGUMENT",
        "inference request to model 'accumulate' must specify a non-zero or non-empty "
        "correlation ID",
    )


def test_an_idle_sequence_is_released(sequence_client: grpcclient.InferenceServerClient) -> None:
    assert step(sequence_client, "forgetful", 55, 1, start=True) == (1, 55)
    time.sleep(4 * IDLE_US / 1e6)
    expect_error(
        lambda: step(sequence_client, "forgetful", 55, 1),
        "StatusCode.INVALID_ARGUMENT",
        "must specify the START flag",
    )


def test_a_sequence_on_a_stream_answers_in_order(sequence_node: RunningNode) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(sequence_node.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        numbers = [3, 1, 4, 1, 5, 9, 2, 6]
        for index, number in enumerate(numbers):
            client.async_stream_infer(
                "accumulate", [value(grpcclient, number)], request_id=str(index),
                sequence_id=4242, sequence_start=index == 0, sequence_end=index == len(numbers) - 1,
            )  # fmt: skip
        got = []
        for _ in numbers:
            result, error = answers.get(timeout=30)
            assert error is None, error
            got.append(int(result.as_numpy("OUTPUT")[0, 0]))
        client.stop_stream()

    assert got == list(np.cumsum(numbers))


def test_a_sequence_over_rest(sequence_node: RunningNode) -> None:
    url = sequence_node.http_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as rest:
        outputs = [
            rest.infer(
                "accumulate", [value(httpclient, number)], sequence_id=31337,
                sequence_start=index == 0, sequence_end=index == 2,
            ).as_numpy("OUTPUT")[0, 0]
            for index, number in enumerate([10, 20, 30])
        ]  # fmt: skip

    assert outputs == [10, 30, 60]


async def test_concurrent_sequences_batch_together(
    sequence_node: RunningNode, sequence_client: grpcclient.InferenceServerClient
) -> None:
    async def run(aio: aioclient.InferenceServerClient, sequence: int) -> list[int]:
        got = []
        for index in range(5):
            result = await aio.infer(
                "accumulate", [value(grpcclient, sequence)], sequence_id=sequence,
                sequence_start=index == 0, sequence_end=index == 4,
            )  # fmt: skip
            got.append(int(result.as_numpy("OUTPUT")[0, 0]))
        return got

    before = sequence_client.get_inference_statistics("accumulate").model_stats[0]
    async with aioclient.InferenceServerClient(sequence_node.grpc_url) as aio:
        outcomes = await asyncio.gather(*(run(aio, sequence) for sequence in range(1, 9)))

    for sequence, got in zip(range(1, 9), outcomes, strict=True):
        assert got == [sequence * n for n in range(1, 6)]
    after = sequence_client.get_inference_statistics("accumulate").model_stats[0]
    requests = after.inference_stats.success.count - before.inference_stats.success.count
    executions = after.execution_count - before.execution_count
    assert requests == 40
    assert executions < requests  # sequences shared executions


def test_a_sequence_id_that_does_not_fit_the_corrid_input_is_invalid(
    sequence_client: grpcclient.InferenceServerClient,
) -> None:
    expect_error(
        lambda: step(sequence_client, "accumulate", -5, 1, start=True),
        "StatusCode.INVALID_ARGUMENT",
        "sequence_id -5 does not fit its CORRID control input 'CORRID'",
    )
