"""The gateway when backends fail, leave, come back or register, and when it stops itself:
no client request fails that another backend could answer."""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from kapi.node.registration import Registrar
from tritonclient.utils import InferenceServerException

from tests.support import models
from tests.support.gateway import RunningGateway, start_gateway
from tests.support.node import RunningNode, free_port, start_node

CONFIG = "max_batch_size: 8\n"
TOKEN = "admin-token-for-tests"
# One request waits for a batch of 8 for half a second: requests that are surely in flight.
SLOW_CONFIG = """max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 500000 preferred_batch_size: [ 8 ] }
"""


def repository(root: Path, config: str = CONFIG) -> Path:
    models.save_model(root, "plus", models.add_constant_model(1.0), 1, config)
    return root


def request(value: float = 0.0) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))
    return [tensor]


def load(
    gateway: RunningGateway, clients: int, seconds: float, during: Callable[[float], None]
) -> tuple[int, list[str]]:
    """`clients` threads, each with its own connection, send requests for `seconds` while
    `during(elapsed)` runs in this thread; returns (answers, errors)."""
    stop = threading.Event()
    answered = [0] * clients
    errors: list[str] = []

    def client(index: int) -> None:
        with grpcclient.InferenceServerClient(gateway.grpc_url) as triton:
            while not stop.is_set():
                try:
                    value = float(index)
                    result = triton.infer("plus", request(value))
                    assert result.as_numpy("OUTPUT0")[0, 0] == value + 1
                    answered[index] += 1
                except (InferenceServerException, AssertionError) as exc:
                    errors.append(repr(exc))

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            during(elapsed)
            time.sleep(0.05)
        stop.set()
        for future in futures:
            future.result()
    return sum(answered), errors


def test_a_node_killed_under_load_fails_no_request_and_is_used_again_when_back(
    tmp_path: Path, node_logs: Path
) -> None:
    first = start_node(repository(tmp_path / "a"), node_logs)
    second = start_node(repository(tmp_path / "b"), node_logs)
    gateway = start_gateway([first.grpc_url, second.grpc_url], node_logs)
    restarted: list[RunningNode] = []
    try:
        gateway.wait_for(
            "serving plus twice", lambda b: all(e["models"] for e in b.values()) and len(b) == 2
        )
        ports = (first.grpc_port, first.http_port, first.metrics_port)

        def chaos(elapsed: float) -> None:
            if elapsed > 1.0 and first.process.poll() is None:
                first.process.send_signal(signal.SIGKILL)
                first.process.wait()
            if elapsed > 2.5 and not restarted:
                restarted.append(start_node(repository(tmp_path / "a"), node_logs, ports=ports))

        answered, errors = load(gateway, 16, 4.0, chaos)
        assert errors == [], errors[:5]
        assert answered > 100
        assert restarted, "the node was not started again"
        gateway.wait_for("using the node again", lambda b: b[first.grpc_url]["healthy"])
        before = gateway.backends()[first.grpc_url]["requests"]
        answered, errors = load(gateway, 4, 1.0, lambda _: None)
        assert errors == []
        assert gateway.backends()[first.grpc_url]["requests"] > before
        assert "kapi_gateway_retries_total" in gateway.metrics()
    finally:
        gateway.terminate()
        for node in [first, second, *restarted]:
            node.terminate()


def test_a_stream_continues_on_another_node_when_its_node_drains(
    tmp_path: Path, node_logs: Path
) -> None:
    nodes = [start_node(repository(tmp_path / name), node_logs) for name in "ab"]
    gateway = start_gateway([node.grpc_url for node in nodes], node_logs)
    try:
        gateway.wait_for(
            "serving plus twice", lambda b: all(e["models"] for e in b.values()) and len(b) == 2
        )
        answers: list[object] = []
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            client.start_stream(
                callback=lambda result, error: answers.append(
                    error if error is not None else float(result.as_numpy("OUTPUT0")[0, 0])
                )
            )
            for value in range(5):
                client.async_stream_infer("plus", request(float(value)))
            _wait_until(lambda: len(answers) == 5)
            on = [a for a, entry in gateway.backends().items() if entry["outstanding"] == 1]
            assert len(on) == 1, gateway.backends()  # the stream holds one backend
            draining = next(node for node in nodes if node.grpc_url == on[0])
            draining.process.send_signal(signal.SIGTERM)
            assert draining.process.wait(30) == 0
            for value in range(5, 10):
                client.async_stream_infer("plus", request(float(value)))
            _wait_until(lambda: len(answers) == 10)
            client.stop_stream()
        assert answers == [float(value) + 1 for value in range(10)]
    finally:
        gateway.terminate()
        for node in nodes:
            node.terminate()


def test_requests_a_draining_node_did_not_run_are_sent_to_another(
    tmp_path: Path, node_logs: Path
) -> None:
    """Three requests wait in the node's batcher when it drains; three more reach it as it
    drains: it answers the first three and ends the stream saying the rest were not run.
    The gateway sends those to the other node: the client sees six answers, in order."""
    nodes = [start_node(repository(tmp_path / n, SLOW_CONFIG), node_logs) for n in "ab"]
    gateway = start_gateway([node.grpc_url for node in nodes], node_logs)
    try:
        gateway.wait_for("serving plus twice", lambda b: len(b) == 2 and all(
            e["models"] for e in b.values()))  # fmt: skip
        answers: list[object] = []
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            client.start_stream(
                callback=lambda result, error: answers.append(
                    error if error is not None else float(result.as_numpy("OUTPUT0")[0, 0])
                )
            )
            for value in range(3):
                client.async_stream_infer("plus", request(float(value)))
            _wait_until(lambda: any(e["outstanding"] for e in gateway.backends().values()))
            on = next(a for a, e in gateway.backends().items() if e["outstanding"])
            draining = next(node for node in nodes if node.grpc_url == on)
            draining.process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            for value in range(3, 6):
                client.async_stream_infer("plus", request(float(value)))
            _wait_until(lambda: len(answers) == 6)
            client.stop_stream()
        assert answers == [float(value) + 1 for value in range(6)]
        assert draining.process.wait(30) == 0
        assert 'kapi_gateway_retries_total{model="plus"} 1.0' in gateway.metrics()  # it moved
    finally:
        gateway.terminate()
        for node in nodes:
            node.terminate()


def test_sigterm_ends_an_idle_stream_at_once(tmp_path: Path, node_logs: Path) -> None:
    node = start_node(repository(tmp_path / "n"), node_logs)
    gateway = start_gateway([node.grpc_url], node_logs)
    try:
        gateway.wait_for("serving plus", lambda b: all(e["models"] for e in b.values()))
        answers: list[object] = []
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            client.start_stream(callback=lambda result, error: answers.append(error or result))
            client.async_stream_infer("plus", request(1.0))
            _wait_until(lambda: len(answers) == 1)
            started = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            assert gateway.process.wait(30) == 0
            assert time.monotonic() - started < 10  # not the 30 s drain timeout
            _wait_until(lambda: len(answers) == 2)
            client.stop_stream()
        assert isinstance(answers[1], InferenceServerException)
        assert answers[1].status() == "StatusCode.UNAVAILABLE"
        assert "the gateway is draining" in answers[1].message()
    finally:
        gateway.terminate()
        node.terminate()


def test_sigterm_lets_the_gateways_requests_in_flight_finish(
    tmp_path: Path, node_logs: Path
) -> None:
    node = start_node(repository(tmp_path / "slow", SLOW_CONFIG), node_logs)
    gateway = start_gateway([node.grpc_url], node_logs)
    try:
        gateway.wait_for("serving plus", lambda b: all(e["models"] for e in b.values()))

        def one(value: int) -> float:
            with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
                started = time.monotonic()
                result = client.infer("plus", request(float(value)))
                assert time.monotonic() - started > 0.2  # it was waiting when SIGTERM came
                return float(result.as_numpy("OUTPUT0")[0, 0])

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, value) for value in range(6)]
            time.sleep(0.2)
            gateway.process.send_signal(signal.SIGTERM)
            results = [future.result() for future in futures]
        assert results == [float(value) + 1 for value in range(6)]
        assert gateway.process.wait(30) == 0
        assert "draining" in gateway.log()
    finally:
        gateway.terminate()
        node.terminate()


def test_deadlines_pass_through_and_grpc_health_checks_backends(
    tmp_path: Path, node_logs: Path
) -> None:
    node = start_node(repository(tmp_path / "slow", SLOW_CONFIG), node_logs)
    gateway = start_gateway([node.grpc_url], node_logs, args=["--health-check", "grpc-health"])
    try:
        gateway.wait_for("serving plus", lambda b: all(e["models"] for e in b.values()))
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as raised:
                client.infer("plus", request(), client_timeout=0.1)  # it waits 0.5 s
            assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert time.monotonic() - started < 0.45
            assert client.infer("plus", request(1.0)).as_numpy("OUTPUT0")[0, 0] == 2.0
        node.process.send_signal(signal.SIGTERM)  # not serving: its health says so
        gateway.wait_for("the node unhealthy", lambda b: not b[node.grpc_url]["healthy"])
    finally:
        gateway.terminate()
        node.terminate()


def test_the_deadline_and_metadata_reach_the_backend(node_logs: Path) -> None:
    """A backend of our own (a real grpc.aio server in this process) records what each
    ModelInfer brought: the time left and the client's metadata."""
    from concurrent.futures import Future

    import grpc
    from tritonclient.grpc import service_pb2 as pb

    seen: Future[tuple[float | None, dict[str, str]]] = Future()
    port = free_port()

    async def backend(stop: asyncio.Event) -> None:
        async def unary(method: str, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if method == "ServerReady":
                return pb.ServerReadyResponse(ready=True).SerializeToString()
            if method == "ServerMetadata":
                return pb.ServerMetadataResponse(name="fake").SerializeToString()
            if method == "RepositoryIndex":
                index = pb.RepositoryIndexResponse()
                index.models.add(name="plus", version="1", state="READY")
                return index.SerializeToString()
            if not seen.done():
                metadata = {k: v for k, v in context.invocation_metadata() or ()}
                seen.set_result((context.time_remaining(), metadata))
            return pb.ModelInferResponse(model_name="plus").SerializeToString()

        handlers = {
            m: grpc.unary_unary_rpc_method_handler(functools.partial(unary, m))
            for m in ("ServerReady", "ServerMetadata", "RepositoryIndex", "ModelInfer")
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await stop.wait()
        await server.stop(0)

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(backend(stop),))
    thread.start()
    gateway = None
    try:
        gateway = start_gateway([f"127.0.0.1:{port}"], node_logs)
        gateway.wait_for("serving plus", lambda b: all(e["models"] for e in b.values()))
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            client.infer("plus", request(), client_timeout=5.0, headers={"x-trace": "abc"})
        remaining, metadata = seen.result(10)
        assert remaining is not None
        assert 3.0 < remaining <= 5.0  # the client's 5 s, less the way there
        assert metadata["x-trace"] == "abc"
    finally:
        if gateway is not None:
            gateway.terminate()
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()  # unclosed, it warns where it is collected: in another test


def test_a_registered_backend_is_served_until_its_lease_expires(
    tmp_path: Path, node_logs: Path
) -> None:
    node = start_node(repository(tmp_path / "edge"), node_logs, env={"KAPI_PROFILES": "rpi5"})
    gateway = start_gateway([], node_logs, wait_ready=False)
    try:
        body = {"address": node.grpc_url, "profile": "rpi5", "lease_s": 1.0}
        assert gateway.admin("POST", "/v1/registrations", json=body).is_success
        gateway.wait_for(
            "serving the registered node", lambda b: bool(b) and b[node.grpc_url]["models"]
        )
        assert gateway.backends()[node.grpc_url]["hardware"] == "edge"
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            assert client.infer("plus", request(1.0)).as_numpy("OUTPUT0")[0, 0] == 2.0
            gateway.wait_for("the lease expired", lambda b: not b, timeout_s=10)
            with pytest.raises(InferenceServerException) as raised:
                client.infer("plus", request())
            assert raised.value.status() == "StatusCode.NOT_FOUND"

        # The node's own client keeps its lease alive, renewing at a third of it.
        registrar = Registrar(gateway.http_url, node.grpc_url, "rpi5", lease_s=1.0)
        seen: list[bool] = []

        async def keep_registered() -> None:
            task = asyncio.create_task(registrar.run())
            for _ in range(25):  # 2.5 s: past two leases
                await asyncio.sleep(0.1)
                seen.append(node.grpc_url in await asyncio.to_thread(gateway.backends))
            task.cancel()
            await registrar.leave()

        asyncio.run(keep_registered())
        assert all(seen[5:]), seen
        assert gateway.backends() == {}  # leaving is at once
        bad = gateway.admin("POST", "/v1/registrations", json={"address": "nohost", "lease_s": 1})
        assert bad.status_code == 422
        assert "HOST:PORT" in bad.json()["error"]
    finally:
        gateway.terminate()
        node.terminate()


def test_a_node_that_dials_in_registers_and_leaves_before_it_drains(
    tmp_path: Path, node_logs: Path
) -> None:
    gateway = start_gateway([], node_logs, wait_ready=False, args=["--admin-token", TOKEN])
    node = None
    try:
        args = ["--register-with", gateway.http_url, "--registration-lease-s", "2",
                "--gateway-token", TOKEN]  # fmt: skip
        node = start_node(repository(tmp_path / "edge"), node_logs, args=args,
                          env={"KAPI_PROFILES": "rpi5,cpu-arm64"})  # fmt: skip
        gateway.wait_for("serving the node that registered", lambda b: bool(b) and all(
            e["models"] for e in b.values()))  # fmt: skip
        (entry,) = gateway.backends().values()
        assert entry["address"] == node.grpc_url
        assert entry["hardware"] == "edge"
        time.sleep(3)  # past its lease: renewed
        assert node.grpc_url in gateway.backends()
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            assert client.infer("plus", request(2.0)).as_numpy("OUTPUT0")[0, 0] == 3.0
        node.process.send_signal(signal.SIGTERM)
        gateway.wait_for("the node gone", lambda b: not b, timeout_s=10)
        assert node.process.wait(30) == 0
    finally:
        gateway.terminate()
        if node is not None:
            node.terminate()


def test_a_node_refuses_to_register_a_wildcard_address() -> None:
    from kapi.node.settings import NodeSettings

    with pytest.raises(ValueError, match="advertise_address"):
        NodeSettings(register_with="http://gw:8000", host="0.0.0.0")
    with pytest.raises(ValueError, match="needs register_with"):
        NodeSettings(advertise_address="edge:8001")
    with pytest.raises(ValueError, match="advertise_address is HOST:PORT"):
        NodeSettings(register_with="http://gw:8000", advertise_address="edge")


def test_a_backend_that_keeps_failing_is_ejected_and_probed_back(
    tmp_path: Path, node_logs: Path
) -> None:
    """`gather` on the small node fails inside its runtime (INTERNAL) for index 5; the large
    node answers. Errors that reached a model pass through, never retried; five in a row
    eject the small node, which comes back once its ejection ends."""
    small, large = tmp_path / "small", tmp_path / "large"
    models.save_model(small, "gather", models.gather_model(table_size=2), 1, CONFIG)
    models.save_model(large, "gather", models.gather_model(table_size=10), 1, CONFIG)
    nodes = [start_node(small, node_logs), start_node(large, node_logs)]
    gateway = start_gateway([node.grpc_url for node in nodes], node_logs)
    try:
        gateway.wait_for("serving gather twice", lambda b: len(b) == 2 and all(
            e["models"] for e in b.values()))  # fmt: skip
        assert gateway.admin("PUT", "/v1/routes/gather", json={"policy": "round-robin"}).is_success
        indices = grpcclient.InferInput("INDICES", [1, 2], "INT64")
        indices.set_data_from_numpy(np.array([[5, 1]], np.int64))
        outcomes = []
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            for _ in range(20):
                try:
                    client.infer("gather", [indices])
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(str(exc.status()))
            # Five INTERNAL from the small node, then it is ejected: the rest on the large one.
            assert outcomes.count("StatusCode.INTERNAL") == 5
            assert outcomes[-10:] == ["ok"] * 10
            small_entry = gateway.backends()[nodes[0].grpc_url]
            assert small_entry["ejected"]
            assert small_entry["ejections"] == 1
            assert 'reason="failures"' in gateway.metrics()
            gateway.wait_for("probed back", lambda b: not b[nodes[0].grpc_url]["ejected"])
    finally:
        gateway.terminate()
        for node in nodes:
            node.terminate()


def test_model_control_goes_to_the_backends_whose_repository_has_the_model(
    tmp_path: Path, node_logs: Path
) -> None:
    explicit = ["--model-control-mode", "explicit"]
    first = start_node(repository(tmp_path / "a"), node_logs, args=explicit)
    second = start_node(repository(tmp_path / "b"), node_logs, args=explicit)
    gateway = start_gateway([first.grpc_url, second.grpc_url], node_logs)
    try:
        with grpcclient.InferenceServerClient(gateway.grpc_url) as client:
            with pytest.raises(InferenceServerException) as raised:
                client.infer("plus", request())
            assert raised.value.status() == "StatusCode.NOT_FOUND"
            client.load_model("plus")  # on both: both repositories have it
            assert {a for a, e in gateway.backends().items() if e["models"]} == {
                first.grpc_url,
                second.grpc_url,
            }
            assert client.infer("plus", request(1.0)).as_numpy("OUTPUT0")[0, 0] == 2.0
            with pytest.raises(InferenceServerException) as raised:
                client.load_model("absent")
            assert "no backend of this gateway has model 'absent'" in raised.value.message()
            client.unload_model("plus")
            with pytest.raises(InferenceServerException) as raised:
                client.infer("plus", request())
            assert raised.value.status() == "StatusCode.NOT_FOUND"
    finally:
        gateway.terminate()
        first.terminate()
        second.terminate()


def test_sighup_reloads_routes_and_keeps_them_when_the_file_is_bad(
    tmp_path: Path, node_logs: Path
) -> None:
    node = start_node(repository(tmp_path / "n"), node_logs)
    config = tmp_path / "gateway.yaml"
    config.write_text("routes:\n  plus: {policy: round-robin}\n")
    gateway = start_gateway([node.grpc_url], node_logs, args=["--config", str(config)])
    try:
        assert gateway.admin("GET", "/v1/routes/plus").json()["route"]["policy"] == "round-robin"
        config.write_text("routes:\n  plus: {policy: weighted}\n")
        gateway.process.send_signal(signal.SIGHUP)
        _wait_until(lambda: _policy(gateway) == "weighted")
        config.write_text("routes:\n  plus: {policy: fastest}\n")
        gateway.process.send_signal(signal.SIGHUP)
        _wait_until(lambda: "the config was not reloaded" in gateway.log())
        assert _policy(gateway) == "weighted"
        assert "unknown policy 'fastest'" in gateway.log()
    finally:
        gateway.terminate()
        node.terminate()


def test_a_bad_config_file_stops_the_gateway_at_start(tmp_path: Path, node_logs: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("routes:\n  plus: {split: {'1': -5}}\n")
    with pytest.raises(Exception, match=r"kapi gateway: error: .*routes\.plus\.split\.1"):
        start_gateway([], node_logs, args=["--config", str(config)], wait_ready=False, attempts=1)


def _policy(gateway: RunningGateway) -> str:
    return str(gateway.admin("GET", "/v1/routes/plus").json()["route"]["policy"])


def _wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)
