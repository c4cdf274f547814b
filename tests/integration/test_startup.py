"""Starting a node that cannot start: one clear line and exit status 2, never a traceback;
and a gRPC port another node holds is refused unless both ask to share it, as in Triton."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import models
from tests.support.node import HOST, KAPI, NodeFactory, free_port


def run_node(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`kapi node` with these flags, expected to exit by itself."""
    return subprocess.run(
        [str(KAPI), "node", "--host", HOST, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def ports(grpc: int | None = None, http: int | None = None) -> list[str]:
    return [
        "--grpc-port", str(grpc or free_port()),
        "--http-port", str(http or free_port()),
        "--metrics-port", str(free_port()),
    ]  # fmt: skip


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.startswith("kapi node: error:")]
    assert len(ours) == 1, done.stderr
    for word in words:
        assert word in ours[0]
    assert "Traceback" not in done.stderr


def test_a_missing_model_repository(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_directory"
    done = run_node("--model-repository", str(missing), *ports())
    assert_one_clear_line(done, str(missing), "not a directory")


def test_an_invalid_setting(tmp_path: Path) -> None:
    done = run_node(
        "--model-repository", str(tmp_path), *ports(), env={"KAPI_NODE_DRAIN_TIMEOUT_S": "soon"}
    )
    assert_one_clear_line(done, "invalid settings", "drain_timeout_s")


def test_a_list_setting_that_is_not_json(tmp_path: Path) -> None:
    done = run_node(
        "--model-repository", str(tmp_path), *ports(), env={"KAPI_NODE_LOAD_MODELS": "good"}
    )
    assert_one_clear_line(done, "invalid settings", "load_models")


def test_a_port_out_of_range(tmp_path: Path) -> None:
    """gRPC would take 70000 modulo 65536 and listen on 4464."""
    done = run_node("--model-repository", str(tmp_path), "--grpc-port", "70000")
    assert_one_clear_line(done, "grpc_port", "65535")


def test_sigterm_while_the_models_load_drains_without_serving(
    tmp_path: Path, start_kapi_node: NodeFactory
) -> None:
    """A node stopped before it has served never tells a grpc.health.v1 watcher (a load
    balancer) that it is SERVING."""
    # Seconds of loading, one model after another, where the signal comes 0.1 s after the
    # node answers (300 models load in about 1 s here; 60 were too few on a fast run).
    model = models.add_constant_model(1.0)
    for index in range(1000):
        models.save_model(tmp_path, f"model_{index:04}", model)
    node = start_kapi_node(tmp_path, wait_for="live")
    with grpc.insecure_channel(node.grpc_url) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        statuses = [next(watch).status]
        node.process.send_signal(signal.SIGTERM)
        assert not node.is_ready()  # the models were still loading when the signal came
        with contextlib.suppress(grpc.RpcError):  # the stream ends when the node stops
            statuses += [message.status for message in watch]
    assert node.process.wait(timeout=60) == 0
    assert health_pb2.HealthCheckResponse.SERVING not in statuses
    assert "node serving" not in node.log()


def test_an_http_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_node("--model-repository", str(tmp_path), *ports(http=port))
    assert_one_clear_line(done, "HTTP", f"{HOST}:{port}", "in use")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    models.save_model(tmp_path, "identity", models.identity_model("FP32"))
    return tmp_path


def test_a_grpc_port_another_node_holds_is_refused(
    repository: Path, start_kapi_node: NodeFactory
) -> None:
    """grpcio would share the port (SO_REUSEPORT) and silently take part of its traffic."""
    first = start_kapi_node(repository)
    done = run_node("--model-repository", str(repository), *ports(grpc=first.grpc_port))
    assert_one_clear_line(done, f"{HOST}:{first.grpc_port}", "already in use", "--reuse-grpc-port")
    assert first.process.poll() is None


def test_nodes_that_both_ask_share_the_grpc_port(
    repository: Path, start_kapi_node: NodeFactory
) -> None:
    share: Sequence[str] = ["--reuse-grpc-port", "true"]
    first = start_kapi_node(repository, args=share)
    # The later --grpc-port wins over the one the harness picks.
    second = start_kapi_node(repository, args=[*share, "--grpc-port", str(first.grpc_port)])
    assert second.is_ready()
    assert first.process.poll() is None
    assert second.process.poll() is None
