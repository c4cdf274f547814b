"""Start a real `kapi node` process on loopback ports and wait until it is ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import httpx

KAPI = Path(sys.executable).with_name("kapi")
HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# Signs in the log that a port picked as free was taken before the node bound it.
_PORT_TAKEN = ("already in use", "failed to bind")


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# What start_node waits for: the node ready (its models loaded), or only answering (live),
# for a node that is not to become ready (strict readiness with a model that fails).
WaitFor = Literal["ready", "live"]


class NodeFactory(Protocol):
    """Starts a ready `kapi node` on a repository (what the `start_kapi_node` fixture gives)."""

    def __call__(
        self,
        repository: Path | None,
        *,
        explicit: bool = False,
        load_models: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        wait_for: WaitFor = "ready",
    ) -> RunningNode: ...


class NodeFailedToStart(RuntimeError):
    pass


@dataclass
class ServerProcess:
    """A server process started by the tests (a kapi node, a gateway, a Triton), on
    loopback ports, with its log."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_ready(self) -> bool:
        return self._answers("ready")

    def _answers(self, probe: str) -> bool:
        try:
            return httpx.get(f"{self.http_url}/v2/health/{probe}", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def metrics(self) -> str:
        response = httpx.get(self.metrics_url, timeout=10.0)
        response.raise_for_status()
        return response.text

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        return terminate(self.process, timeout_s)


@dataclass
class RunningNode(ServerProcess):
    def is_live(self) -> bool:
        return self._answers("live")


def terminate(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait for the exit; SIGKILL if it does not come. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def start_node(
    repository: Path | None,
    log_dir: Path,
    *,
    explicit: bool = False,
    load_models: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    wait_for: WaitFor = "ready",
    attempts: int = 3,
    ports: tuple[int, int, int] | None = None,
) -> RunningNode:
    """A `kapi node` serving `repository` (None: no directory, for a node that follows the
    model repository), ready (or only live: `wait_for`). `args` are
    more command-line flags; `ports` (gRPC, HTTP, metrics) are the ones to listen on, for a
    node started again where it was."""
    flags = [*(["--model-control-mode", "explicit"] if explicit else [])]
    for name in load_models:
        flags += ["--load-model", name]
    for attempt in range(attempts):
        node = _spawn(repository, log_dir, [*flags, *args], env or {}, attempt, ports)
        try:
            _wait(node, wait_for)
        except NodeFailedToStart:
            node.terminate()
            if attempt + 1 < attempts and any(s in node.log().lower() for s in _PORT_TAKEN):
                continue
            raise
        return node
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_node(
    repository: Path,
    log_dir: Path,
    *,
    explicit: bool = False,
    load_models: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    wait_for: WaitFor = "ready",
) -> Iterator[RunningNode]:
    """A ready node for the `with` block; stopped (SIGTERM, then SIGKILL) when it ends."""
    node = start_node(
        repository,
        log_dir,
        explicit=explicit,
        load_models=load_models,
        env=env,
        args=args,
        wait_for=wait_for,
    )
    try:
        yield node
    finally:
        node.terminate()


def _spawn(
    repository: Path | None,
    log_dir: Path,
    flags: Sequence[str],
    env: Mapping[str, str],
    attempt: int,
    ports: tuple[int, int, int] | None = None,
) -> RunningNode:
    grpc_port, http_port, metrics_port = ports or (free_port(), free_port(), free_port())
    command = [
        str(KAPI), "node",
        *(["--model-repository", str(repository)] if repository is not None else []),
        "--host", HOST,
        "--grpc-port", str(grpc_port),
        "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
        *flags,
    ]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"node-{grpc_port}-{attempt}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    return RunningNode(process, grpc_port, http_port, metrics_port, log_path)


def _wait(node: RunningNode, wait_for: WaitFor) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise NodeFailedToStart(
                f"kapi node exited with {node.process.returncode}:\n{node.log()}"
            )
        if node.is_ready() or (wait_for == "live" and node.is_live()):
            return
        time.sleep(0.1)
    raise NodeFailedToStart(f"kapi node not {wait_for} after {READY_TIMEOUT_S} s:\n{node.log()}")
