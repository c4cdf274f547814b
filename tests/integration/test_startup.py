"""Starting a node that cannot start: one clear line and exit status 2, never a traceback;
and a gRPC port another node holds is refused unless both ask to share it, as in Triton."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

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
