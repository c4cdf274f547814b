"""Benchmark the kapi gateway against nginx as a plain gRPC proxy, and both against calling
the node directly, side by side in one run.

One `kapi node` serves two ONNX Identity models (FP32; `small`, a 1x16 request, and `large`,
a 1x3x224x224 one, 600 KB each way), so the node computes next to nothing and the transport
is what is measured. Four ways to it: `direct`; `kapi`, the kapi gateway with the node as
its backend, as shipped; `python-floor`, a bare raw-bytes grpc.aio proxy on the gateway's
stack with no feature at all (gatewaybench/floor.py: what Python's gRPC costs by itself);
`nginx`, nginx 1.22 `grpc_pass`ing to the node, configured fairly (listed in the printout).
Closed-loop tritonclient.grpc load at concurrency 1 and 16, with one connection shared by
every client thread (tritonclient's default) and with one connection per thread, each cell
run by a fresh client process so that the client's CPU is told apart from the servers'.
Every cell is measured once per round, the rounds interleaved (the order rotated each
round), and each figure is the median over the rounds. CPU time per request of the proxy,
the node and the client comes from /proc (utime + stime) over each measured window. Prints a
table and the goals; writes bench/results/gateway-<time>.json.

    .venv/bin/python bench/gateway.py [--quick] [--rounds 3] [--seconds 3]
        [--contenders direct kapi python-floor nginx nginx-default-buffers haproxy]
        [--requests small large]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

# Spawned client processes import this file again: what it imports stays light (no torch).
from gatewaybench import client, report, servers
from gatewaybench.client import MODES, CellRun, CellSpec
from gatewaybench.report import DIRECT, KAPI, NGINX, Key
from gatewaybench.shapes import BY_NAME, REQUESTS
from nodebench.process import Server, ServerCommand, serving

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NGINX_DEFAULT_BUFFERS = "nginx-default-buffers"
# A bare raw-bytes grpc.aio proxy (gatewaybench/floor.py): what Python's gRPC stack costs
# with no feature at all, beside what the gateway costs with all of them.
FLOOR = "python-floor"
# HAProxy reading the model name from the body: an existing engine that could be the data
# plane (opt-in: --contenders ... haproxy).
HAPROXY = "haproxy"
CONTENDERS = (DIRECT, KAPI, FLOOR, NGINX, NGINX_DEFAULT_BUFFERS, HAPROXY)
DEFAULT_CONTENDERS = (DIRECT, KAPI, FLOOR, NGINX)
LIMITS = """\
Limits of the method:
- Everything shares this machine's cores: the node, the proxy, nginx and the Python
  client. The client is in a process of its own (its CPU is counted apart), but it still
  takes cores from the servers, so every throughput, direct included, is lower than the
  servers alone would reach and the throughput ratios are compressed toward 1 where a
  proxy's own CPU is small next to the client's and the node's.
- The node is Python gRPC (grpc.aio): it, not the proxy, is the ceiling of every path, and
  its CPU per request depends on how its connections are used (one busy connection or many).
- A proxy's CPU per request is its processes' utime + stime over the window divided by the
  requests answered in it: it includes the gateway's health probes (one a second) and
  whatever the proxy does while idle; nginx's is its master and its one worker. /proc
  counts in clock ticks (10 ms): with --quick's 1 s windows a proxy's figure is within
  about 10 % where it uses 0.1 s of CPU in the window.
- Loopback only: no network latency, so the added p50 is the proxy's own processing and
  the scheduling it causes, a larger share of the round trip than on a real network.
- Latency is that of closed-loop clients (each waits for its answer before the next), so at
  concurrency 16 p50 includes queueing and follows throughput.
- A round's figure is one window of --seconds; the median over --rounds rounds is reported
  (the JSON keeps every round). On a shared machine, rerun before trusting a difference of
  a few percent."""


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    seconds: float
    warmup_s: float
    concurrency: tuple[int, ...]
    modes: tuple[str, ...]
    requests: tuple[str, ...]
    contenders: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    server: Server  # what the client connects to (the node itself for `direct`)
    sessions: dict[str, int]  # whose CPU is read: node, and proxy where there is one
    node_port: int  # the node's gRPC port, where the proxy's upstream connections go


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = _plan(args)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds, so the servers are stopped
    if any(name.startswith(NGINX) for name in plan.contenders):
        servers.ensure_nginx()
    started, clock, load_before = datetime.now(), time.perf_counter(), _loadavg()
    print(
        f"{plan.rounds} round(s) of {len(_cells(plan))} cells, {plan.seconds:g} s each "
        f"(after {plan.warmup_s:g} s of warm-up); load average {load_before[0]:.2f}",
        flush=True,
    )
    logs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kapi-bench-gateway-") as tmp:
        root = Path(tmp)
        commands: dict[str, ServerCommand] = {}
        with contextlib.ExitStack() as stack:
            contenders, backends_before = _start(root, plan, stack, commands)
            _warm_up(contenders, plan)
            runs = _measure_rounds(contenders, plan, commands)
            backends_after = _gateway_backends(contenders)
        # The servers are stopped: their logs are complete.
        logs = {name: servers.log_tail(command.log) for name, command in commands.items()}
    elapsed = time.perf_counter() - clock
    rows = report.rows(runs)
    goals = report.goals(rows)
    print(f"\n{report.table(rows, list(plan.contenders))}\n")
    print(_legend())
    print(f"\n{report.goal_table(goals)}\n")
    print(_nginx_notes(plan))
    print(f"\n{LIMITS}\n")
    for name, tail in logs.items():
        if tail.strip():
            print(f"{name} log (last lines):\n{tail}\n")
    meta = _meta(started, elapsed, plan, load_before, logs, backends_before, backends_after)
    path = RESULTS / f"gateway-{started:%Y%m%d-%H%M%S}.json"
    report.write_json(path, rows, goals, runs, meta)
    print(f"{elapsed:.0f} s in all; results in {path.relative_to(REPO)}")
    return 0


def _start(
    root: Path, plan: Plan, stack: contextlib.ExitStack, commands: dict[str, ServerCommand]
) -> tuple[list[Contender], list[dict[str, object]]]:
    """The node, then the proxies the plan names; each contender checked with one request
    of each kind. The servers stop when `stack` closes."""
    models = servers.write_models(root / "models")
    commands["node"] = servers.node_command(root / "node", models)
    print("starting the kapi node ...", flush=True)
    node = stack.enter_context(serving(commands["node"]))
    contenders = []
    backends: list[dict[str, object]] = []
    for name in plan.contenders:
        if name == DIRECT:
            contenders.append(Contender(name, node, {"node": node.pid}, node.ports.grpc))
            continue
        if name == KAPI:
            commands[name] = servers.gateway_command(root / "gateway", node.ports.grpc_url)
        elif name == FLOOR:
            commands[name] = servers.floor_command(root / "floor", node.ports.grpc_url)
        elif name == HAPROXY:
            commands[name] = servers.haproxy_command(root / "haproxy", node.ports.grpc_url)
        else:
            tuned = name == NGINX
            commands[name] = servers.nginx_command(root / name, name, node.ports.grpc_url, tuned)
        print(f"starting {name} ...", flush=True)
        proxy = stack.enter_context(serving(commands[name]))
        if name == KAPI:
            backends = servers.wait_gateway_backends(proxy.ports, list(models))
        sessions = {"node": node.pid, "proxy": proxy.pid}
        contenders.append(Contender(name, proxy, sessions, node.ports.grpc))
    for contender in contenders:
        for request in plan.requests:
            client.check(contender.server.ports.grpc_url, BY_NAME[request])
    return contenders, backends


def _warm_up(contenders: list[Contender], plan: Plan) -> None:
    """Each contender and request once at the highest concurrency, not recorded: the
    servers' pools, buffers and connections warm before the first measured cell (which has
    its own warm-up too, on its own fresh connections)."""
    print("warming up ...", flush=True)
    for contender in contenders:
        for request in plan.requests:
            spec = _spec(contender, request, max(plan.concurrency), MODES[-1], plan)
            run = client.measure(replace(spec, warmup_s=0.0, measure_s=max(plan.warmup_s, 0.5)))
            if run.error:
                raise RuntimeError(f"{contender.name} failed while warming up:\n{run.error}")


def _measure_rounds(
    contenders: list[Contender], plan: Plan, commands: dict[str, ServerCommand]
) -> dict[Key, list[CellRun]]:
    by_name = {contender.name: contender for contender in contenders}
    cells = _cells(plan)
    runs: dict[Key, list[CellRun]] = {
        (request, concurrency, mode, name): []
        for request, concurrency, mode in cells
        for name in plan.contenders
    }
    for index in range(plan.rounds):
        print(f"round {index + 1} of {plan.rounds}", flush=True)
        for request, concurrency, mode in _rotate(cells, index * max(1, len(cells) // plan.rounds)):
            for name in _rotate(list(plan.contenders), index):
                spec = _spec(by_name[name], request, concurrency, mode, plan)
                run = client.measure(spec)
                runs[(request, concurrency, mode, name)].append(run)
                _print_run(spec, run)
                _check_alive(contenders, commands)
                client.wait_quiet()
    return runs


def _spec(contender: Contender, request: str, concurrency: int, mode: str, plan: Plan) -> CellSpec:
    return CellSpec(
        contender=contender.name,
        url=contender.server.ports.grpc_url,
        request=BY_NAME[request],
        concurrency=concurrency,
        mode=mode,
        warmup_s=plan.warmup_s,
        measure_s=plan.seconds,
        sessions=contender.sessions,
        node_port=contender.node_port,
    )


def _print_run(spec: CellSpec, run: CellRun) -> None:
    label = f"  {spec.request.name:<5} c={spec.concurrency:<2} {spec.mode:<6} {spec.contender:<21}"
    if run.error:
        print(f"{label} FAILED: {run.error.strip().splitlines()[-1]}", flush=True)
        return
    cpu = "  ".join(
        f"{role} {seconds / run.requests * 1e6:5.0f}" for role, seconds in sorted(run.cpu_s.items())
    )
    print(f"{label} {run.throughput:7.0f} req/s  CPU us/req: {cpu}", flush=True)


def _check_alive(contenders: list[Contender], commands: dict[str, ServerCommand]) -> None:
    """A server that died mid-run ends the run, with its log."""
    for contender in contenders:
        for role, pid in contender.sessions.items():
            if not servers.alive(pid):
                name = "node" if role == "node" else contender.name
                log = commands[name].log
                raise RuntimeError(
                    f"{name} (pid {pid}) died during the run; log {log}:\n{servers.log_tail(log)}"
                )


def _cells(plan: Plan) -> list[tuple[str, int, str]]:
    return [
        (request, concurrency, mode)
        for request in plan.requests
        for concurrency in plan.concurrency
        for mode in plan.modes
    ]


def _rotate(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


def _gateway_backends(contenders: list[Contender]) -> list[dict[str, object]]:
    """What the gateway's admin API says of its backends now (requests, failures, ...)."""
    for contender in contenders:
        if contender.name == KAPI:
            with contextlib.suppress(TimeoutError):
                return servers.wait_gateway_backends(contender.server.ports, list(BY_NAME))
    return []


def _legend() -> str:
    return (
        "req/s: the median round's throughput; x direct: throughput / direct's in the same\n"
        "round; p50, p99: of the round's requests; +p50 %: p50 over direct's in the same round;\n"
        "proxy, node, client us: CPU time (utime + stime) per request answered, over the\n"
        "measured window; conns: the client's connections / the proxy's to the node at the\n"
        "window's end (nginx keeps up to 32 idle ones from earlier cells; the gateway a fixed\n"
        "few, --channels-per-backend, 2 by default). Every figure is the median over the rounds."
    )


def _nginx_notes(plan: Plan) -> str:
    if not any(name.startswith(NGINX) for name in plan.contenders):
        return ""
    lines = [
        f"nginx {servers.nginx_version()}, its own master (-p PREFIX -c CONF -g 'daemon off;'),",
        "configured as a fair gRPC proxy; beyond `grpc_pass grpc://node` it has:",
    ]
    for option, buffer, why in servers.NGINX_OPTIONS:
        mark = "*" if buffer else "-"
        lines += textwrap.wrap(
            f"{option}: {why}", width=92, initial_indent=f" {mark} ", subsequent_indent="   "
        )
    lines += textwrap.wrap(
        "With nginx's defaults for the starred options it reads and forwards the 600 KB "
        "message in small pieces and sends it to the client in 8 KB frames, which costs "
        "nginx and the Python ends (the client most) much more CPU per request; "
        f"`--contenders direct nginx {NGINX_DEFAULT_BUFFERS}` measures nginx without them.",
        width=92,
        break_on_hyphens=False,
    )
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        args.rounds, args.seconds, args.warmup_s = 1, 1.0, 0.5
    return Plan(
        rounds=args.rounds,
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        concurrency=tuple(args.concurrency),
        modes=tuple(m for m in MODES if m in args.modes),
        requests=tuple(r.name for r in REQUESTS if r.name in args.requests),
        contenders=tuple(c for c in CONTENDERS if c == DIRECT or c in args.contenders),
    )


def _meta(
    started: datetime,
    elapsed: float,
    plan: Plan,
    load_before: list[float],
    logs: dict[str, str],
    backends_before: list[dict[str, object]],
    backends_after: list[dict[str, object]],
) -> dict[str, object]:
    packages = ["kapi", "grpcio", "tritonclient", "numpy", "onnxruntime", "onnx", "uvloop"]
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    versions["nginx"] = servers.nginx_version()
    return {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
        },
        "versions": versions,
        "plan": asdict(plan),
        "requests": {r.name: list(r.shape) for r in REQUESTS},
        "nginx_options": [
            {"option": option, "default_buffers_drop_it": buffer, "why": why}
            for option, buffer, why in servers.NGINX_OPTIONS
        ],
        "gateway_backends": {"before": backends_before, "after": backends_after},
        "logs": logs,
    }


def _cpu_model() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _loadavg() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s cells, 0.5 s warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of every cell")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds a cell measures")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="warm-up before each cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--requests", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(DEFAULT_CONTENDERS),
        help=f"direct is always measured; {NGINX_DEFAULT_BUFFERS} is nginx without the "
        "buffer options (not measured unless named)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
