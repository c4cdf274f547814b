"""Ensembles (`platform: "ensemble"`) run a DAG of the node's models inside it, as Triton
users chain preprocessing, a model and postprocessing: on both transports, with the
composing models batching their parts, errors naming the ensemble, dependencies loaded and
unloaded with it, and bad ensembles refused at load."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient

from tests.support import models
from tests.support.clients import expect_error
from tests.support.node import NodeFactory, RunningNode, running_node

CHAIN = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" } ]
ensemble_scheduling { step [
  { model_name: "add1" model_version: -1
    input_map { key: "INPUT0" value: "IN" } output_map { key: "OUTPUT0" value: "mid" } },
  { model_name: "add10" model_version: 1
    input_map { key: "INPUT0" value: "mid" } output_map { key: "OUTPUT0" value: "OUT" } }
] }
"""
# Two steps of `simple` (add/sub): the second takes the first's output and the input again.
FANOUT = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [
  { name: "TRIPLE" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "SAME" data_type: TYPE_INT32 dims: [ 16 ] }
]
ensemble_scheduling { step [
  { model_name: "simple"
    input_map [ { key: "INPUT0" value: "X" }, { key: "INPUT1" value: "X" } ]
    output_map [ { key: "OUTPUT0" value: "double" }, { key: "OUTPUT1" value: "zero" } ] },
  { model_name: "simple"
    input_map [ { key: "INPUT0" value: "double" }, { key: "INPUT1" value: "X" } ]
    output_map [ { key: "OUTPUT0" value: "TRIPLE" }, { key: "OUTPUT1" value: "SAME" } ] }
] }
"""
GATHER = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "I" data_type: TYPE_INT64 dims: [ 2 ] } ]
output [ { name: "O" data_type: TYPE_FP32 dims: [ 2 ] } ]
ensemble_scheduling { step [
  { model_name: "gather" input_map { key: "INDICES" value: "I" }
    output_map { key: "OUTPUT0" value: "O" } }
] }
"""
BATCHED_ADD = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n"


def broken(
    steps: str, outputs: str = 'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]'
) -> str:
    return f"""
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 4 ] }} ]
{outputs}
ensemble_scheduling {{ step [ {steps} ] }}
"""


BROKEN = {
    "unknown_model": (
        broken('{ model_name: "nowhere" input_map { key: "INPUT0" value: "IN" } '
               'output_map { key: "OUTPUT0" value: "OUT" } }'),
        "its model 'nowhere' failed to load",
    ),
    "unproduced_output": (
        broken('{ model_name: "add1" input_map { key: "INPUT0" value: "IN" } '
               'output_map { key: "OUTPUT0" value: "other" } }'),
        "ensemble output 'OUT' for ensemble unproduced_output is not produced by any step",
    ),
    "unknown_tensor": (
        broken('{ model_name: "add1" input_map { key: "INPUT0" value: "IN" } '
               'output_map { key: "OUTPUT0" value: "OUT" } }, '
               '{ model_name: "add10" input_map { key: "INPUT0" value: "ghost" } '
               'output_map { key: "OUTPUT0" value: "spare" } }'),
        "tensor 'ghost' is taken by a step, but it is neither an ensemble input",
    ),
    "wrong_model_tensor": (
        broken('{ model_name: "add1" input_map { key: "NOPE" value: "IN" } '
               'output_map { key: "OUTPUT0" value: "OUT" } }'),
        "the model has no input 'NOPE'",
    ),
    "optional_input": (
        broken('{ model_name: "add1" input_map { key: "INPUT0" value: "IN" } '
               'output_map { key: "OUTPUT0" value: "OUT" } }').replace(
            "dims: [ 4 ] } ]", "dims: [ 4 ] optional: true } ]", 1
        ),
        "input 'IN' is optional, which kapi's ensembles do not support",
    ),
    "wrong_datatype": (
        broken('{ model_name: "simple" input_map [ { key: "INPUT0" value: "IN" }, '
               '{ key: "INPUT1" value: "IN" } ] output_map { key: "OUTPUT0" value: "OUT" } }'),
        "input 'INPUT0' of model 'simple' is INT32, but ensemble tensor 'IN' is FP32",
    ),
}  # fmt: skip


def build(root: Path) -> Path:
    models.save_model(root, "add1", models.add_constant_model(1.0), config=BATCHED_ADD)
    models.save_model(root, "add10", models.add_constant_model(10.0))
    models.save_model(root, "simple", models.add_sub_model())
    models.save_model(root, "gather", models.gather_model())
    models.save_ensemble(root, "chain", CHAIN)
    (root / "chain" / "labels.txt").write_text("a\nb\nc\nd\n")
    models.save_ensemble(root, "fanout", FANOUT)
    models.save_ensemble(root, "ensemble_gather", GATHER)
    return root


@pytest.fixture(scope="module")
def ensemble_node(
    tmp_path_factory: pytest.TempPathFactory, node_logs: Path
) -> Iterator[RunningNode]:
    with running_node(build(tmp_path_factory.mktemp("ensembles")), node_logs) as node:
        yield node


@pytest.fixture(scope="module")
def ensemble_client(ensemble_node: RunningNode) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(ensemble_node.grpc_url) as client:
        yield client


def fp32_input(module: type, name: str, data: np.ndarray) -> object:
    tensor = module.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def test_a_chain_runs_its_steps_in_order(ensemble_client: grpcclient.InferenceServerClient) -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = ensemble_client.infer("chain", [fp32_input(grpcclient, "IN", data)])

    np.testing.assert_array_equal(result.as_numpy("OUT"), data + 11.0, strict=True)
    metadata = ensemble_client.get_model_metadata("chain")
    assert metadata.platform == "ensemble"
    assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("IN", [-1, 4])]
    (stats,) = ensemble_client.get_inference_statistics("chain").model_stats
    assert stats.inference_stats.success.count >= 1


def test_an_ensemble_output_is_classified_with_its_labels(
    ensemble_client: grpcclient.InferenceServerClient,
) -> None:
    data = np.array([[0.0, 3.0, 1.0, 2.0]], dtype=np.float32)
    top = [grpcclient.InferRequestedOutput("OUT", class_count=2)]
    result = ensemble_client.infer("chain", [fp32_input(grpcclient, "IN", data)], outputs=top)

    assert result.as_numpy("OUT").tolist() == [[b"14.000000:1:b", b"13.000000:3:d"]]


def test_a_chain_over_rest(ensemble_node: RunningNode) -> None:
    data = np.ones((1, 4), dtype=np.float32)
    url = ensemble_node.http_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as rest:
        result = rest.infer("chain", [fp32_input(httpclient, "IN", data)])
        assert rest.get_model_config("chain")["platform"] == "ensemble"

    np.testing.assert_array_equal(result.as_numpy("OUT"), data + 11.0)


def test_steps_take_the_inputs_and_each_others_outputs(
    ensemble_client: grpcclient.InferenceServerClient,
) -> None:
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    tensor = grpcclient.InferInput("X", [1, 16], "INT32")
    tensor.set_data_from_numpy(x)
    result = ensemble_client.infer("fanout", [tensor])
    np.testing.assert_array_equal(result.as_numpy("TRIPLE"), 3 * x, strict=True)
    np.testing.assert_array_equal(result.as_numpy("SAME"), x, strict=True)

    only = ensemble_client.infer(
        "fanout", [tensor], outputs=[grpcclient.InferRequestedOutput("SAME")]
    )
    assert [o.name for o in only.get_response().outputs] == ["SAME"]


async def test_concurrent_ensemble_requests_batch_in_their_models(
    ensemble_node: RunningNode, ensemble_client: grpcclient.InferenceServerClient
) -> None:
    rows = [np.full((1, 4), float(n), dtype=np.float32) for n in range(12)]
    async with aioclient.InferenceServerClient(ensemble_node.grpc_url) as aio:
        results = await asyncio.gather(
            *(aio.infer("chain", [fp32_input(grpcclient, "IN", row)]) for row in rows)
        )

    for row, result in zip(rows, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy("OUT"), row + 11.0, strict=True)
    (stats,) = ensemble_client.get_inference_statistics("add1").model_stats
    assert stats.execution_count < stats.inference_stats.success.count  # add1 batched them


def test_a_failing_step_names_the_ensemble(
    ensemble_client: grpcclient.InferenceServerClient,
) -> None:
    indices = grpcclient.InferInput("I", [1, 2], "INT64")
    indices.set_data_from_numpy(np.array([[0, 99]], dtype=np.int64))
    expect_error(
        lambda: ensemble_client.infer("ensemble_gather", [indices]),
        "StatusCode.INTERNAL",
        "in ensemble 'ensemble_gather', ",
    )


def test_the_ensemble_checks_its_own_inputs(
    ensemble_client: grpcclient.InferenceServerClient,
) -> None:
    data = np.zeros((1, 5), dtype=np.float32)
    expect_error(
        lambda: ensemble_client.infer("chain", [fp32_input(grpcclient, "IN", data)]),
        "StatusCode.INVALID_ARGUMENT",
        "'IN'",
    )


def test_loading_an_ensemble_loads_its_models_and_unload_dependents_unloads_them(
    tmp_path: Path, start_kapi_node: NodeFactory
) -> None:
    node = start_kapi_node(build(tmp_path), explicit=True)
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        assert not client.is_model_ready("add1")
        client.load_model("chain")
        assert client.is_model_ready("add1")
        assert client.is_model_ready("add10")
        data = np.zeros((1, 4), dtype=np.float32)
        result = client.infer("chain", [fp32_input(grpcclient, "IN", data)])
        np.testing.assert_array_equal(result.as_numpy("OUT"), data + 11.0)

        client.load_model("fanout")
        client.unload_model("chain", unload_dependents=True)
        assert not client.is_model_ready("chain")
        assert not client.is_model_ready("add1")
        assert client.is_model_ready("simple")  # fanout's, not chain's

        client.unload_model("fanout")  # without its dependents
        assert client.is_model_ready("simple")


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_bad_ensemble_fails_its_load_with_the_reason(
    tmp_path: Path, start_kapi_node: NodeFactory, name: str
) -> None:
    root = build(tmp_path)
    config, words = BROKEN[name]
    models.save_ensemble(root, name, config)
    node = start_kapi_node(root, explicit=True)
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        expect_error(lambda: client.load_model(name), "StatusCode.INVALID_ARGUMENT", words)
