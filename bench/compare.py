"""Two commits of the node side by side: the same model, the same load, rounds interleaved.

    .venv/bin/python bench/compare.py --base REV [--model mlp] [--concurrency 8] [--rounds 6]

The working tree's node runs against the node of commit REV (checked out in a temporary git
worktree; both import the dependencies of this .venv). Each round measures one node, then
the other, alternating which goes first; it prints each round's requests per second, the
medians, and the server's CPU time per request read from /proc, which is steadier than
throughput on a shared machine. Writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from nodebench.contenders import GrpcTarget
from nodebench.load import run_closed_loop
from nodebench.models import MODELS, build_models
from nodebench.process import Server, serving
from nodebench.servers import Deployment, ServingSettings, kapi_command

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

Nodes = dict[str, tuple[GrpcTarget, Server]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--model", default="mlp", choices=MODELS)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--measure-s", type=float, default=3.0)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kapi-compare-")))
        nodes = _start_nodes(root, args.base, args.model, stack)
        rps, cpu_us = _measure(nodes, args.rounds, args.concurrency, args.measure_s)
    report = {
        name: {
            "rounds_rps": [round(x, 1) for x in rps[name]],
            "median_rps": round(statistics.median(rps[name]), 1),
            "median_server_cpu_us_per_request": round(statistics.median(cpu_us[name])),
        }
        for name in rps
    }
    ratio = statistics.median(rps["tree"]) / statistics.median(rps["base"])
    for name, figures in report.items():
        print(f"{name:5} {figures}")
    print(f"tree / base throughput: {ratio:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"compare-{datetime.now():%Y%m%d-%H%M%S}.json"
    meta = {"base": args.base, "model": args.model, "concurrency": args.concurrency}
    path.write_text(json.dumps({**meta, "nodes": report, "tree_over_base": ratio}, indent=2))
    print(f"results in {path.relative_to(REPO)}")
    return 0


def _start_nodes(root: Path, rev: str, model: str, stack: contextlib.ExitStack) -> Nodes:
    """The base commit's node and the working tree's, serving `model`; stopped with `stack`."""
    base = root / "base"
    git = ["git", "-C", str(REPO), "worktree"]
    subprocess.run([*git, "add", "-q", "--detach", str(base), rev], check=True)
    stack.callback(subprocess.run, [*git, "remove", "--force", str(base)], check=False)
    [spec] = build_models(root, [model])
    deployment = [Deployment(model, spec, 1, batching=False)]
    settings = ServingSettings(1, 1, 16, 500, 0)
    nodes: Nodes = {}
    for name, services in (("base", base / "services"), ("tree", REPO / "services")):
        command = kapi_command(root / f"{name}-models", deployment, settings)  # not the worktree
        argv = ["env", f"PYTHONPATH={services}", *command.argv]
        server = stack.enter_context(serving(dataclasses.replace(command, argv=argv)))
        nodes[name] = (GrpcTarget(server.ports.grpc_url, model, spec), server)
    return nodes


def _measure(
    nodes: Nodes, rounds: int, concurrency: int, measure_s: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Requests per second and server CPU microseconds per request, per node and round."""
    rps: dict[str, list[float]] = {name: [] for name in nodes}
    cpu_us: dict[str, list[float]] = {name: [] for name in nodes}
    for index in range(rounds):
        for name in ("base", "tree") if index % 2 == 0 else ("tree", "base"):
            target, server = nodes[name]
            run = run_closed_loop(target.make_call, concurrency, 1.0, measure_s, server.cpu_seconds)
            assert run.server_cpu_s is not None
            cpu_us[name].append(run.server_cpu_s / len(run.latencies) * 1e6)
            target.release()
            rps[name].append(run.throughput)
    return rps, cpu_us


if __name__ == "__main__":
    sys.exit(main())
