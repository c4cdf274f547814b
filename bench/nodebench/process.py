"""Server subprocesses on loopback ports: start, wait until ready, always stop; and the CPU
time a server's processes have used, read from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Ports:
    grpc: int
    http: int
    metrics: int

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http}"

    @property
    def ready_url(self) -> str:
        return f"http://{HOST}:{self.http}/v2/health/ready"


@dataclass(frozen=True, slots=True)
class ServerCommand:
    """How to start one server: its command line, working directory, log file and, where it
    needs one, its own environment."""

    name: str
    argv: list[str]
    cwd: Path
    log: Path
    ports: Ports
    env: dict[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Server:
    """A running server: its ports and the process that leads its session."""

    name: str
    ports: Ports
    pid: int

    def cpu_seconds(self) -> float:
        return session_cpu_seconds(self.pid)


def session_cpu_seconds(leader: int) -> float:
    """User + system CPU time of every process in the session `leader` leads: a server started
    by `serving` with the processes it starts (Triton's python backend stubs, MLServer's
    workers), with whatever children they have reaped. From /proc/<pid>/stat, which counts
    every thread of a process, including ended ones."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended since the listing
            continue
        fields = stat.rsplit(")", 1)[1].split()  # past the command name, which may hold ")"
        if int(fields[3]) == leader:  # the session id
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def free_ports() -> Ports:
    """Three distinct ports the kernel has just handed out (closed again, so usable)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(3)]
        for sock in sockets:
            sock.bind((HOST, 0))
        grpc, http, metrics = (sock.getsockname()[1] for sock in sockets)
    return Ports(grpc, http, metrics)


@contextlib.contextmanager
def serving(command: ServerCommand) -> Iterator[Server]:
    """Run the server for the duration of the block; stopped on exit, error or not."""
    with command.log.open("wb") as log:
        # Own session: the whole process group (workers included) is stopped at the end.
        process = subprocess.Popen(
            command.argv,
            cwd=command.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=command.env,
            start_new_session=True,
        )
        try:
            _wait_ready(command, process)
            yield Server(command.name, command.ports, process.pid)
        finally:
            _stop(process)


def _wait_ready(command: ServerCommand, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{command.name} exited with {process.returncode} before it was ready; "
                f"log {command.log}:\n{_tail(command.log)}"
            )
        if _is_ready(command.ports.ready_url):
            return
        time.sleep(0.25)
    raise TimeoutError(
        f"{command.name} not ready after {READY_TIMEOUT_S:.0f} s; "
        f"log {command.log}:\n{_tail(command.log)}"
    )


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    _signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT_S)
    # Whatever is left of the group (a hung server, a worker that outlived it) goes now.
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
