"""Benchmark the kapi node against its ceiling and a peer, side by side, in one run.

Three models built here (ResNet-18 and a smaller ResNet on 1x3x224x224, a memory-bound
2048-wide MLP), three kinds of contender (ONNX Runtime called in this process; a kapi node and
MLServer over OIP gRPC through tritonclient, each a subprocess on loopback ports), batch-1
requests from 1 and 8 closed-loop client threads. Every contender uses the same ONNX Runtime
thread settings. Both servers stay up for the whole run and every cell is measured in several
short rounds, interleaved, so a slow minute of the machine does not land on one contender only.
Prints a table and the ratios the node is held to; writes bench/results/node-<time>.json.

    .venv/bin/python bench/node.py [--rounds 5] [--measure-s 3] [--no-peer]
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
import numpy.typing as npt
from nodebench import contenders
from nodebench.load import LoadRun, run_closed_loop, summarize
from nodebench.models import ModelSpec, build_models
from nodebench.process import Ports, serving
from nodebench.report import Row, ratio_table, ratios, table, write_json
from nodebench.servers import (
    MLSERVER_VERSION,
    Deployment,
    ServingSettings,
    ensure_mlserver,
    kapi_command,
    mlserver_command,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CONTENDERS = ("in-process", "kapi", "kapi+batching", "mlserver", "mlserver+batching")
MODELS = ("convnet", "convnet-small", "mlp")
# Executions at once, per model, for every server: the compute-bound conv nets run one per
# core. The MLP runs one at a time, batched or not, so that its batching on/off pair differs
# in the batching switch only (a second instance makes the unbatched MLP ~1.2x faster here,
# but splits the batched one's queue into smaller batches and makes it ~10% slower).
INSTANCES = {"convnet": 2, "convnet-small": 2, "mlp": 1}
BATCHED_MODELS = ("mlp",)  # served a second time with the server's dynamic batching on
References = dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class Plan:
    concurrency: tuple[int, ...]
    rounds: int
    warmup_s: float
    measure_s: float


@dataclass(frozen=True, slots=True)
class Cell:
    """One line of the table: a model, a contender, a concurrency, and what to call."""

    model: str
    contender: str
    concurrency: int
    target: contenders.Target


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    plan = Plan(tuple(args.concurrency), args.rounds, args.warmup_s, args.measure_s)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds, so servers are stopped
    started, clock = datetime.now(), time.perf_counter()
    venv = args.mlserver_venv if args.peer else None
    with tempfile.TemporaryDirectory(prefix="kapi-bench-") as tmp, contextlib.ExitStack() as stack:
        cells = _prepare(Path(tmp), settings, plan, venv, args.instances, stack)
        rows = _measure_rounds(cells, plan)
    found = ratios(rows)
    elapsed = time.perf_counter() - clock
    print(f"\n{table(rows)}\n\n{ratio_table(found)}\n")
    path = RESULTS / f"node-{started:%Y%m%d-%H%M%S}.json"
    instances = {model: args.instances or INSTANCES[model] for model in MODELS}
    meta = _meta(started, elapsed, settings, instances, plan, args.peer)
    write_json(path, rows, found, meta)
    print(f"{elapsed:.0f} s in all; results in {path.relative_to(REPO)}")
    return 0


def _prepare(
    root: Path,
    settings: ServingSettings,
    plan: Plan,
    venv: Path | None,
    instances: int | None,
    stack: contextlib.ExitStack,
) -> list[Cell]:
    """Build the models, start the servers (stopped when `stack` closes), list the cells."""
    print("building models ...", flush=True)
    specs = build_models(root)
    references = {spec.name: _reference(spec, settings) for spec in specs}
    deployments = _deployments(specs, instances)
    commands = [kapi_command(root / "kapi", deployments, settings)]
    if venv is not None:
        ensure_mlserver(venv)
        commands.append(mlserver_command(root / "mlserver", deployments, settings, venv))
    cells = _in_process_cells(specs, settings, plan)
    for command in commands:
        print(f"starting {command.name} ...", flush=True)
        ports = stack.enter_context(serving(command))
        cells += _server_cells(command.name, ports, deployments, plan, references)
    order = {name: index for index, name in enumerate(CONTENDERS)}
    return sorted(cells, key=lambda c: (MODELS.index(c.model), order[c.contender], c.concurrency))


def _deployments(specs: list[ModelSpec], instances: int | None) -> list[Deployment]:
    plain = [
        Deployment(spec.name, spec, instances or INSTANCES[spec.name], batching=False)
        for spec in specs
    ]
    batched = [
        Deployment(f"{spec.name}-batched", spec, instances or INSTANCES[spec.name], batching=True)
        for spec in specs
        if spec.name in BATCHED_MODELS
    ]
    return plain + batched


def _in_process_cells(specs: list[ModelSpec], settings: ServingSettings, plan: Plan) -> list[Cell]:
    cells = []
    for spec in specs:
        target = contenders.InProcessTarget(contenders.session(spec, settings), spec)
        cells += [Cell(spec.name, "in-process", c, target) for c in plan.concurrency]
    return cells


def _server_cells(
    server: str, ports: Ports, deployments: list[Deployment], plan: Plan, references: References
) -> list[Cell]:
    cells = []
    for deployment in deployments:
        contender = f"{server}+batching" if deployment.batching else server
        spec = deployment.spec
        target = contenders.TritonTarget(ports.grpc_url, deployment.served_name, spec)
        _check_output(target, contender, references[spec.name])
        cells += [Cell(spec.name, contender, c, target) for c in plan.concurrency]
    return cells


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
        run = run_closed_loop(target.make_call, cell.concurrency, plan.warmup_s, plan.measure_s)
    finally:
        cell.target.release()
    print(
        f"  {cell.model:<13} {cell.contender:<18} c={cell.concurrency:<2} "
        f"{run.throughput:8.1f} req/s",
        flush=True,
    )
    return run


def _reference(spec: ModelSpec, settings: ServingSettings) -> npt.NDArray[np.float32]:
    session = contenders.session(spec, settings)
    output: npt.NDArray[np.float32] = session.run(None, {spec.input_name: spec.sample(1)})[0]
    return output


def _check_output(
    target: contenders.TritonTarget, contender: str, expected: npt.NDArray[np.float32]
) -> None:
    """A contender that answers wrongly would be measured doing something else."""
    got = target.infer_once(target.spec.sample(1))
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"{contender} answered {target.served_name} differently from ORT")


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
    instances: dict[str, int],
    plan: Plan,
    peer: bool,
) -> dict[str, object]:
    packages = ["kapi", "onnxruntime", "torch", "tritonclient", "grpcio", "numpy"]
    versions = {name: version(name) for name in packages}
    if peer:
        versions["mlserver"] = MLSERVER_VERSION
    return {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "versions": versions,
        "settings": asdict(settings),
        "instances": instances,
        "plan": asdict(plan),
    }


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
    parser.add_argument("--mlserver-venv", type=Path, default=REPO / ".venv-mlserver")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip MLServer")
    return parser


if __name__ == "__main__":
    sys.exit(main())
