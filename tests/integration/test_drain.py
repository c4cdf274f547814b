"""SIGTERM: the node turns not-ready, refuses new work, finishes what is in flight, exits 0.

The model's dynamic batcher holds a lone request for up to 3 s waiting for company, so a
request sent just before the signal is still in flight while the node drains."""

from __future__ import annotations

import queue
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support import models
from tests.support.node import NodeFactory, RunningNode

HOLD_US = 3_000_000
SLOW_CONFIG = f"""
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: {HOLD_US} }}
"""
Outcome = tuple[grpcclient.InferResult | None, InferenceServerException | None]


def add_input(value: float) -> list[grpcclient.InferInput]:
    infer_input = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    infer_input.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
    return [infer_input]


def ready_status(node: RunningNode) -> int | None:
    """The HTTP status of /v2/health/ready; None once nothing listens."""
    try:
        return httpx.get(f"{node.http_url}/v2/health/ready", timeout=2).status_code
    except httpx.TransportError:
        return None


def wait_not_ready(node: RunningNode, timeout_s: float = 10.0) -> int | None:
    deadline = time.monotonic() + timeout_s
    while (status := ready_status(node)) == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    return status


def test_sigterm_drains_in_flight_requests_then_exits(
    tmp_path: Path, start_kapi_node: NodeFactory
) -> None:
    models.save_model(tmp_path, "slow", models.add_constant_model(1.0), config=SLOW_CONFIG)
    node = start_kapi_node(tmp_path)
    outcomes: queue.Queue[Outcome] = queue.Queue()
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        assert client.is_server_ready()
        client.async_infer(
            "slow", add_input(41.0), lambda result, error: outcomes.put((result, error))
        )
        time.sleep(0.5)  # the request reaches the batcher, which holds it for 3 s
        assert outcomes.empty()

        node.process.send_signal(signal.SIGTERM)
        status = wait_not_ready(node)
        in_flight_during_drain = outcomes.empty()
        with_new_work = None
        try:
            client.infer("slow", add_input(0.0), client_timeout=10)
        except InferenceServerException as exc:
            with_new_work = exc
        result, error = outcomes.get(timeout=30)

    assert status == 400  # not ready, as Triton answers it
    assert in_flight_during_drain
    assert error is None
    assert result is not None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), 42.0))
    assert with_new_work is not None
    assert with_new_work.status() == "StatusCode.UNAVAILABLE"
    assert node.process.wait(timeout=30) == 0
    assert "node stopped" in node.log()


def test_sigterm_on_an_idle_node_exits_promptly(
    tmp_path: Path, start_kapi_node: NodeFactory
) -> None:
    models.save_model(tmp_path, "idle", models.identity_model("FP32"))
    node = start_kapi_node(tmp_path)

    node.process.send_signal(signal.SIGTERM)

    assert node.process.wait(timeout=30) == 0
    assert ready_status(node) is None


def test_sigterm_answers_an_open_stream_then_ends_it(
    tmp_path: Path, start_kapi_node: NodeFactory
) -> None:
    """A client keeps its stream open; the node answers the request in flight on it, ends
    the stream with UNAVAILABLE (so the client knows to go elsewhere) and exits, without
    waiting out its 120 s drain timeout."""
    models.save_model(tmp_path, "slow", models.add_constant_model(1.0), config=SLOW_CONFIG)
    node = start_kapi_node(tmp_path, env={"KAPI_NODE_DRAIN_TIMEOUT_S": "120"})
    outcomes: queue.Queue[Outcome] = queue.Queue()
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
        client.async_stream_infer("slow", add_input(41.0), request_id="held")
        time.sleep(0.5)  # the request reaches the batcher, which holds it for 3 s
        assert outcomes.empty()

        node.process.send_signal(signal.SIGTERM)
        result, error = outcomes.get(timeout=30)
        _, stream_end = outcomes.get(timeout=30)
        exit_code = node.process.wait(timeout=30)
        client.stop_stream()

    assert error is None
    assert result is not None
    assert result.get_response().id == "held"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), 42.0))
    assert stream_end is not None
    assert stream_end.status() == "StatusCode.UNAVAILABLE"
    assert "draining" in stream_end.message()
    assert exit_code == 0
    assert "node stopped" in node.log()


BATCHING_CONFIG = """
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 20000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
CLIENTS = 16


def test_sigterm_under_load_cancels_nothing(tmp_path: Path, start_kapi_node: NodeFactory) -> None:
    """16 clients keep a batching model busy; SIGTERM arrives mid-stream. Each request
    either completes with its own answer or is refused UNAVAILABLE (what clients and
    gRPC retry policies retry elsewhere); none ends CANCELLED."""
    models.save_model(tmp_path, "busy", models.add_constant_model(1.0), config=BATCHING_CONFIG)
    node = start_kapi_node(tmp_path)
    answered: queue.Queue[bool] = queue.Queue()
    endings: queue.Queue[str] = queue.Queue()

    def keep_sending(index: int) -> None:
        with grpcclient.InferenceServerClient(node.grpc_url) as client:
            value = float(index)
            while True:
                try:
                    result = client.infer("busy", add_input(value), client_timeout=30)
                except InferenceServerException as exc:
                    endings.put(str(exc.status()))
                    return
                output = result.as_numpy("OUTPUT0")
                answered.put(output is not None and bool((output == value + 1).all()))

    threads = [threading.Thread(target=keep_sending, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while answered.qsize() < 5 * CLIENTS and time.monotonic() < deadline:
        time.sleep(0.01)  # until the model is under load, with requests always in flight
    node.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    exit_code = node.process.wait(timeout=30)

    statuses = [endings.get_nowait() for _ in range(endings.qsize())]
    answers = [answered.get_nowait() for _ in range(answered.qsize())]
    assert len(statuses) == CLIENTS
    assert set(statuses) == {"StatusCode.UNAVAILABLE"}, statuses
    assert all(answers)
    assert len(answers) >= 5 * CLIENTS
    assert exit_code == 0
