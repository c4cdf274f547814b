"""The load generator, one fresh client process per measured cell.

Each cell's closed loop (`nodebench.load.run_closed_loop`: `concurrency` threads, one
request at a time each, a warm-up, then a fixed window) runs in a process of its own, started
with multiprocessing's spawn, so that the CPU the client spends is its own process's and is
told apart from the servers': at the two edges of the window (no request in flight at either)
the process reads utime + stime of itself, of the node's session and of the proxy's session
from /proc. Two ways to connect, as the issue asks:

- `shared`: one `tritonclient.grpc.InferenceServerClient` shared by every thread, which is
  tritonclient's default of one channel (one HTTP/2 connection) for a process;
- `own`: one client per thread, each on its own connection. gRPC shares one connection
  between channels with equal arguments (its global subchannel pool), so these clients add
  `grpc.use_local_subchannel_pool` to tritonclient's default channel arguments; the number of
  connections each cell really held is recorded, on the client's side and on the node's.

This module is imported by the client processes: it stays light (no torch, no onnx).
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
from nodebench.load import Call, run_closed_loop
from nodebench.process import session_cpu_seconds

from gatewaybench.shapes import DATATYPE, INPUT, OUTPUT, Array, Request

MODES = ("shared", "own")
_INT32_MAX = 2**31 - 1
_CONTEXT = multiprocessing.get_context("spawn")


@dataclass(frozen=True, slots=True)
class CellSpec:
    """What one client process does: `concurrency` threads send `request` to `url` for
    `warmup_s` and then `measure_s` seconds; `sessions` names the processes whose CPU time
    is read at the window's edges (role: the pid that leads the session)."""

    contender: str
    url: str
    request: Request
    concurrency: int
    mode: str
    warmup_s: float
    measure_s: float
    sessions: dict[str, int]
    node_port: int


@dataclass(slots=True)
class CellRun:
    """One measured window: every request's latency (seconds), the window's length, the CPU
    seconds each role used in it (`client` is the load process itself), and the TCP
    connections open at its end: the client's to its target and, behind a proxy, the proxy's
    to the node (nginx holds one per request in flight, up to its keepalive; the gateway a
    fixed few)."""

    latencies: list[float]
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    client_connections: int = 0
    upstream_connections: int | None = None
    error: str | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def measure(spec: CellSpec) -> CellRun:
    """Run the cell in a fresh client process; a failure there comes back as `error`."""
    receive, send = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(target=_child, args=(spec, send), daemon=True)
    process.start()
    send.close()
    timeout_s = spec.warmup_s + spec.measure_s + 60.0
    try:
        if not receive.poll(timeout_s):
            return CellRun([], 0.0, error=f"the client process gave no answer in {timeout_s:.0f} s")
        result: CellRun = receive.recv()
        return result
    except EOFError:
        return CellRun([], 0.0, error=f"the client process died (exit code {process.exitcode})")
    finally:
        receive.close()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def _child(spec: CellSpec, send: Connection) -> None:
    try:
        result = run_cell(spec)
    except BaseException:
        result = CellRun([], 0.0, error=traceback.format_exc())
    send.send(result)
    send.close()


def run_cell(spec: CellSpec) -> CellRun:
    """The cell's closed loop in this process (`measure` calls it in a fresh one)."""
    target = _Target(spec)
    clocks = _Clocks(spec.sessions)
    try:
        run = run_closed_loop(
            target.make_call, spec.concurrency, spec.warmup_s, spec.measure_s, clocks
        )
        client_connections = _connections(os.getpid(), _port(spec.url))
        proxy = spec.sessions.get("proxy")
        upstream = None if proxy is None else _connections(proxy, spec.node_port)
    finally:
        target.close()
    start, end = clocks.readings
    return CellRun(
        latencies=run.latencies,
        seconds=run.seconds,
        cpu_s={role: end[role] - start[role] for role in start},
        client_connections=client_connections,
        upstream_connections=upstream,
    )


def check(url: str, request: Request) -> None:
    """One request through `url`; the Identity model must answer with the input."""
    client = grpcclient.InferenceServerClient(url)
    try:
        sent = request.sample(1)
        got = _Caller(client, request, sent)()
    finally:
        client.close()
    if got.shape != sent.shape or got.dtype != sent.dtype or not np.array_equal(got, sent):
        raise RuntimeError(f"{url} answered {request.name} with something else than its input")


class _Clocks:
    """The CPU clock `run_closed_loop` reads at the window's edges: each call records the
    CPU seconds of every role (and of this process, `client`); what it returns is unused."""

    def __init__(self, sessions: dict[str, int]) -> None:
        self.sessions = sessions
        self.readings: list[dict[str, float]] = []

    def __call__(self) -> float:
        reading = {role: session_cpu_seconds(pid) for role, pid in self.sessions.items()}
        reading["client"] = _own_cpu_seconds()
        self.readings.append(reading)
        return 0.0


class _Caller:
    """One thread's request, built once (tritonclient serializes the tensor here), sent on
    every call; the answer is decoded to numpy as a caller would."""

    def __init__(self, client: grpcclient.InferenceServerClient, request: Request, data: Array):
        self.client = client
        self.model = request.name
        self.inputs = [grpcclient.InferInput(INPUT, list(request.shape), DATATYPE)]
        self.inputs[0].set_data_from_numpy(data)
        self.outputs = [grpcclient.InferRequestedOutput(OUTPUT)]

    def __call__(self) -> Array:
        result = self.client.infer(self.model, self.inputs, outputs=self.outputs)
        output: Array = result.as_numpy(OUTPUT)
        return output


class _Target:
    """The clients of one cell: one shared by every thread, or one per thread."""

    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.clients: list[grpcclient.InferenceServerClient] = []

    def make_call(self) -> Call:
        if self.spec.mode == "shared":
            if not self.clients:
                self.clients.append(grpcclient.InferenceServerClient(self.spec.url))
            client = self.clients[0]
        else:
            client = grpcclient.InferenceServerClient(
                self.spec.url, channel_args=_own_connection_args()
            )
            self.clients.append(client)
        seed = len(self.clients)
        return _Caller(client, self.spec.request, self.spec.request.sample(seed))

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _own_connection_args() -> list[tuple[str, Any]]:
    """tritonclient's default channel arguments, plus a subchannel pool of the channel's own,
    so that each client really has its own connection."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", _INT32_MAX),
        ("grpc.max_receive_message_length", _INT32_MAX),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def _own_cpu_seconds() -> float:
    """utime + stime of this process, every thread of it."""
    with open(f"/proc/{os.getpid()}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connections(pid: int, port: int) -> int:
    """Established TCP connections to `port` of `pid` and its children (nginx's worker)."""
    try:
        leader = psutil.Process(pid)
        connections = [c for p in (leader, *leader.children(True)) for c in p.connections("tcp")]
    except psutil.Error:
        return -1
    return sum(
        1
        for c in connections
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port
    )


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def wait_quiet(seconds: float = 0.2) -> None:
    """A short pause between cells, so one cell's tail (a closing connection, a server's
    cleanup) does not land in the next cell's window."""
    time.sleep(seconds)
