"""Benchmark the kapi node against its ceiling and two peers, side by side, in one run.

Four models built here (ResNet-18 and a smaller ResNet on 1x3x224x224, a memory-bound
2048-wide MLP, Triton's 16-element INT32 add/sub `simple`), and these contenders: ONNX
Runtime called in this process; a kapi node over OIP gRPC, over KServe v2 REST with binary
tensors, and over gRPC with the tensors in system shared memory; NVIDIA Triton 2.51 (python
backend running ONNX Runtime) and MLServer over gRPC, all through tritonclient, each server a
subprocess on loopback ports. Batch-1 requests from 1 and 8 closed-loop client threads. Every
contender uses the same ONNX Runtime thread settings and every server the same executions at
once. The servers stay up for the whole run and every cell is measured in several short
rounds, interleaved, so a slow minute of the machine does not land on one contender only.
Prints a table (with each server's CPU time per request) and the ratios the node is held to;
writes bench/results/node-<time>.json.

    .venv/bin/python bench/node.py [--rounds 5] [--measure-s 3] [--no-triton] [--no-mlserver]
        [--models addsub convnet-small] [--contenders in-process kapi kapi-shm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType

import numpy as np
from nodebench import contenders
from nodebench.load import CpuClock, LoadRun, run_closed_loop, summarize
from nodebench.models import MODELS, Array, ModelSpec, build_models
from nodebench.process import Server, ServerCommand, serving
from nodebench.report import Row, ratio_table, ratios, table, write_json
from nodebench.servers import (
    MLSERVER_VERSION,
    TRITON_DEFAULT_VENV,
    TRITON_VERSION,
    Deployment,
    ServingSettings,
    ensure_mlserver,
    ensure_triton,
    kapi_command,
    mlserver_command,
    triton_command,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SERVERS = ("kapi", "triton", "mlserver")
CONTENDERS = (
    "in-process",
    "kapi",
    "kapi-rest",
    "kapi-shm",
    "kapi+batching",
    "triton",
    "triton+batching",
    "mlserver",
    "mlserver+batching",
)
# Executions at once, per model, for every server: the compute-bound conv nets run one per
# core. The MLP runs one at a time, batched or not, so that its batching on/off pair differs
# in the batching switch only (a second instance makes the unbatched MLP ~1.2x faster here,
# but splits the batched one's queue into smaller batches and makes it ~10% slower). The
# add/sub model computes next to nothing: one instance, as Triton's `simple` has.
INSTANCES = {"convnet": 2, "convnet-small": 2, "mlp": 1, "addsub": 1}
BATCHED_MODELS = ("mlp",)  # served a second time with the server's dynamic batching on
# kapi-shm: where the tensors are big enough for their transport to matter.
SHARED_MEMORY_MODELS = ("convnet", "convnet-small")
References = dict[str, list[Array]]


@dataclass(frozen=True, slots=True)
class Plan:
    concurrency: tuple[int, ...]
    rounds: int
    warmup_s: float
    measure_s: float


@dataclass(frozen=True, slots=True)
class Selection:
    """What this run measures: the models, the contenders, and where the peers live (None:
    that peer is skipped)."""

    models: tuple[str, ...]
    contenders: tuple[str, ...]
    instances: int | None
    mlserver_venv: Path | None
    triton_venv: Path | None

    def serves(self, server: str) -> bool:
        """Whether a chosen contender calls `server`, and it is not skipped."""
        skipped = {"triton": self.triton_venv is None, "mlserver": self.mlserver_venv is None}
        if skipped.get(server, False):
            return False
        return any(_server_of(contender) == server for contender in self.contenders)


@dataclass(frozen=True, slots=True)
class Cell:
    """One line of the table: a model, a contender, a concurrency, what to call and, for a
    server, its CPU clock."""

    model: str
    contender: str
    concurrency: int
    target: contenders.Target
    cpu: CpuClock | None = None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    plan = Plan(tuple(args.concurrency), args.rounds, args.warmup_s, args.measure_s)
    selection = Selection(
        models=tuple(m for m in MODELS if m in args.models),
        contenders=tuple(c for c in CONTENDERS if c in args.contenders),
        instances=args.instances,
        mlserver_venv=args.mlserver_venv if args.mlserver else None,
        triton_venv=args.triton_venv if args.triton else None,
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds, so servers are stopped
    started, clock = datetime.now(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kapi-bench-") as tmp, contextlib.ExitStack() as stack:
        cells = _prepare(Path(tmp), settings, plan, selection, stack)
        rows = _measure_rounds(cells, plan)
    found = ratios(rows)
    elapsed = time.perf_counter() - clock
    print(f"\n{table(rows)}\n\n{ratio_table(found)}\n")
    path = RESULTS / f"node-{started:%Y%m%d-%H%M%S}.json"
    write_json(path, rows, found, _meta(started, elapsed, settings, selection, plan))
    print(f"{elapsed:.0f} s in all; results in {path.relative_to(REPO)}")
    return 0


def _prepare(
    root: Path,
    settings: ServingSettings,
    plan: Plan,
    selection: Selection,
    stack: contextlib.ExitStack,
) -> list[Cell]:
    """Build the models, start the servers (stopped when `stack` closes), list the cells."""
    print("building models ...", flush=True)
    specs = build_models(root, selection.models)
    references = {spec.name: _reference(spec, settings) for spec in specs}
    batching = any(c.endswith("+batching") for c in selection.contenders)
    deployments = _deployments(specs, selection.instances, batching)
    cells = _in_process_cells(specs, settings, plan) if "in-process" in selection.contenders else []
    for command in _commands(root, deployments, settings, selection):
        print(f"starting {command.name} ...", flush=True)
        server = stack.enter_context(serving(command))
        cells += _server_cells(server, deployments, plan, references, selection.contenders)
    order = {name: index for index, name in enumerate(CONTENDERS)}
    return sorted(cells, key=lambda c: (MODELS.index(c.model), order[c.contender], c.concurrency))


def _commands(
    root: Path, deployments: list[Deployment], settings: ServingSettings, selection: Selection
) -> list[ServerCommand]:
    """The servers the selected contenders need, peers installed on first use."""
    commands = []
    if selection.serves("kapi"):
        commands.append(kapi_command(root / "kapi", deployments, settings))
    if (venv := selection.triton_venv) is not None and selection.serves("triton"):
        ensure_triton(venv)
        commands.append(triton_command(root / "triton", deployments, settings, venv))
    if (venv := selection.mlserver_venv) is not None and selection.serves("mlserver"):
        ensure_mlserver(venv)
        commands.append(mlserver_command(root / "mlserver", deployments, settings, venv))
    return commands


def _deployments(specs: list[ModelSpec], instances: int | None, batching: bool) -> list[Deployment]:
    plain = [
        Deployment(spec.name, spec, instances or INSTANCES[spec.name], batching=False)
        for spec in specs
    ]
    batched = [
        Deployment(f"{spec.name}-batched", spec, instances or INSTANCES[spec.name], batching=True)
        for spec in specs
        if batching and spec.name in BATCHED_MODELS
    ]
    return plain + batched


def _in_process_cells(specs: list[ModelSpec], settings: ServingSettings, plan: Plan) -> list[Cell]:
    cells = []
    for spec in specs:
        target = contenders.InProcessTarget(contenders.session(spec, settings), spec)
        cells += [Cell(spec.name, "in-process", c, target) for c in plan.concurrency]
    return cells


def _server_cells(
    server: Server,
    deployments: list[Deployment],
    plan: Plan,
    references: References,
    chosen: tuple[str, ...],
) -> list[Cell]:
    """Every way of calling each of the server's deployments: gRPC; for kapi also REST and
    (on the big tensors) gRPC with shared memory. Each is checked before it is timed."""
    cells = []
    for deployment in deployments:
        for contender, target in _targets(server, deployment):
            if contender not in chosen:
                continue
            _check_output(target, contender, references[deployment.spec.name])
            cells += [
                Cell(deployment.spec.name, contender, c, target, server.cpu_seconds)
                for c in plan.concurrency
            ]
    return cells


def _targets(server: Server, deployment: Deployment) -> list[tuple[str, contenders.ServedTarget]]:
    name, spec, grpc_url = deployment.served_name, deployment.spec, server.ports.grpc_url
    if deployment.batching:
        return [(f"{server.name}+batching", contenders.GrpcTarget(grpc_url, name, spec))]
    targets: list[tuple[str, contenders.ServedTarget]] = [
        (server.name, contenders.GrpcTarget(grpc_url, name, spec))
    ]
    if server.name == "kapi":
        targets.append(("kapi-rest", contenders.HttpTarget(server.ports.http_url, name, spec)))
        if spec.name in SHARED_MEMORY_MODELS:
            targets.append(("kapi-shm", contenders.SharedMemoryTarget(grpc_url, name, spec)))
    return targets


def _measure_rounds(cells: list[Cell], plan: Plan) -> list[Row]:
    runs: list[list[LoadRun]] = [[] for _ in cells]
    for round_number in range(1, plan.rounds + 1):
        print(f"round {round_number} of {plan.rounds}", flush=True)
        for cell, cell_runs in zip(cells, runs, strict=True):
            cell_runs.append(_measure(cell, plan))
    return [
        Row(cell.model, cell.contender, cell.concurrency, summarize(cell_runs))
        for cell, cell_runs in zip(cells, runs, strict=True)
    ]


def _measure(cell: Cell, plan: Plan) -> LoadRun:
    try:
        target = cell.target
        run = run_closed_loop(
            target.make_call, cell.concurrency, plan.warmup_s, plan.measure_s, cell.cpu
        )
    finally:
        cell.target.release()
    cpu = ""
    if run.server_cpu_s is not None:
        cpu = f" {run.server_cpu_s / len(run.latencies) * 1e6:8.0f} server CPU us/req"
    print(
        f"  {cell.model:<13} {cell.contender:<18} c={cell.concurrency:<2} "
        f"{run.throughput:8.1f} req/s{cpu}",
        flush=True,
    )
    return run


def _reference(spec: ModelSpec, settings: ServingSettings) -> list[Array]:
    """ONNX Runtime's answer to the check request; where numpy knows the answer (add/sub), ONNX
    Runtime is held to it too."""
    feed = spec.sample(1)
    outputs: list[Array] = contenders.session(spec, settings).run(spec.output_names, feed)
    if spec.expected is not None:
        _compare(outputs, spec.expected(feed), f"ONNX Runtime answered {spec.name}")
    return outputs


def _check_output(target: contenders.ServedTarget, contender: str, expected: list[Array]) -> None:
    """A contender that answers wrongly would be measured doing something else."""
    got = target.infer_once(target.spec.sample(1))
    _compare(got, expected, f"{contender} answered {target.served_name}")


def _compare(got: list[Array], expected: list[Array], what: str) -> None:
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a.shape != b.shape or a.dtype != b.dtype or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"{what}: output {index} differs from the reference")


def _settings(args: argparse.Namespace) -> ServingSettings:
    return ServingSettings(
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        mlserver_workers=args.mlserver_workers,
    )


def _meta(
    started: datetime,
    elapsed: float,
    settings: ServingSettings,
    selection: Selection,
    plan: Plan,
) -> dict[str, object]:
    packages = ["kapi", "onnxruntime", "torch", "tritonclient", "grpcio", "numpy"]
    versions = {name: version(name) for name in packages}
    if selection.serves("triton"):
        versions["tritonserver"] = TRITON_VERSION
    if selection.serves("mlserver"):
        versions["mlserver"] = MLSERVER_VERSION
    return {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "versions": versions,
        "settings": asdict(settings),
        "instances": {m: selection.instances or INSTANCES[m] for m in selection.models},
        "plan": asdict(plan),
        "models": list(selection.models),
        "contenders": list(selection.contenders),
    }


def _server_of(contender: str) -> str | None:
    """The server a contender calls (None: in-process)."""
    name = contender.split("+")[0].removesuffix("-rest").removesuffix("-shm")
    return name if name in SERVERS else None


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds of every cell")
    parser.add_argument("--measure-s", type=float, default=3.0, help="seconds a round measures")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="warm-up before each round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--inter-op-threads", type=int, default=1)
    parser.add_argument(
        "--instances", type=int, help=f"executions at once for every model (default {INSTANCES})"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument(
        "--mlserver-workers", type=int, default=0, help="MLServer parallel_workers (0: in-process)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to measure"
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(CONTENDERS),
        help="contenders to measure (a server none of them needs is not started)",
    )
    parser.add_argument("--mlserver-venv", type=Path, default=REPO / ".venv-mlserver")
    parser.add_argument(
        "--triton-venv",
        type=Path,
        default=TRITON_DEFAULT_VENV,
        help="Triton's venv, made by bench/tritonpeer/setup.sh on first use "
        "(default $KAPI_TRITON_VENV or /opt/kapi-triton/venv)",
    )
    parser.add_argument("--no-triton", dest="triton", action="store_false", help="skip Triton")
    parser.add_argument(
        "--no-mlserver",
        "--no-peer",
        dest="mlserver",
        action="store_false",
        help="skip MLServer (--no-peer, its old name, skips MLServer only)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
