"""`kapi optimize SOURCE`: a bundle's (or an ONNX model's) variants, each measured and, with
a spec, verified, into a folder."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument

CPU_DEFAULT = "ort-int8-static,fp16,openvino-fp32,openvino-int8"
NVIDIA_DEFAULT = "tensorrt-fp16,tensorrt-int8"


def add_commands(commands: Any) -> None:
    optimize = commands.add_parser("optimize", help="export, compress and measure a model")
    optimize.add_argument("source", type=Path, help="a kapi train bundle, or an ONNX model")
    optimize.add_argument("--dataset", help="for an ONNX model: NAME[@DIGEST] that judges it")
    optimize.add_argument("--out", type=Path, help="default: SOURCE/../variants")
    optimize.add_argument(
        "--optimizations",
        help="comma-separated plugins or chains (prune-structured+ort-int8-static); default: "
        f"{CPU_DEFAULT} for CPU targets, plus {NVIDIA_DEFAULT} for NVIDIA ones",
    )
    optimize.add_argument("--calibration", default="minmax", help="minmax, entropy, percentile")
    optimize.add_argument(
        "--calibration-data", type=Path, help=".npy of raw images (default: the training split)"
    )
    optimize.add_argument("--prune-ratio", type=float, default=0.5, help="share of channels")
    optimize.add_argument("--fine-tune-epochs", type=int, default=3, help="after pruning")
    optimize.add_argument("--requirements", type=Path, help="verify every variant against it")
    optimize.add_argument(
        "--targets", help="profiles to build for (default: this machine's CPU profile)"
    )
    optimize.add_argument("--runs", type=int, default=500, help="timed runs per measurement")
    optimize.add_argument("--root", type=Path, help="the datasets' root ($KAPI_DATA_ROOT)")
    optimize.add_argument("--json", action="store_true", help="JSON instead of a table")
    optimize.set_defaults(handler=_optimize)
    from kapi.optimizer.view import add_commands as add_view

    add_view(commands)
    from kapi.optimizer.service import add_commands as add_service

    add_service(commands)


def _optimize(args: argparse.Namespace) -> None:
    from kapi.core.hardware import cpu_profiles, is_known_profile
    from kapi.core.requirements import load_requirements
    from kapi.optimizer.source import open_source
    from kapi.optimizer.variants import Options, build_variants
    from kapi.trainer.data.store import DatasetStore

    targets = args.targets.split(",") if args.targets else cpu_profiles()[:1]
    unknown = [t for t in targets if not is_known_profile(t)]
    if unknown:
        raise InvalidArgument(f"unknown hardware profile(s) {unknown}")
    default = CPU_DEFAULT
    if any(t.startswith("nvidia-") for t in targets):
        default += "," + NVIDIA_DEFAULT
    plugins = [p.strip() for p in (args.optimizations or default).split(",") if p.strip()]
    root = args.root or Path(os.environ.get("KAPI_DATA_ROOT", "kapi-data"))
    options = Options(
        calibration=args.calibration,
        calibration_data=args.calibration_data,
        prune_ratio=args.prune_ratio,
        fine_tune_epochs=args.fine_tune_epochs,
        requirements=load_requirements(args.requirements) if args.requirements else None,
        profile=targets[0],
        runs=args.runs,
    )
    source = open_source(args.source, DatasetStore(root), args.dataset)
    out = args.out or args.source.parent / "variants"
    table = build_variants(source, out, plugins, options)
    table["targets"] = targets
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print_table(table)
        print(f"variants in {out}")
    if options.requirements is not None and not any(v["verified"] for v in table["variants"]):
        print("no variant meets the requirements", file=sys.stderr)


def print_table(table: dict[str, Any]) -> None:
    parity = table["parity"]
    if parity:
        print(
            f"exported and simplified: max |onnx - torch| {parity['max_abs_difference']:.2g}, "
            f"top-1 agreement {parity['top1_agreement']:.4f} on {parity['samples']:,} test samples"
        )
    fp32 = table["variants"][0]
    print(
        f"{'variant':<34} {'runtime':<11} {'size':>6} {'accuracy':>8} {'agree':>6} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'x fp32':>6} {'rps':>7} {'batch':>5} {'MB':>5} verdict"
    )
    for row in table["variants"]:
        if row["status"] != "built":
            print(f"{row['name']:<34} {row['runtime']:<11} {row['status']}")
            continue
        verdict = {None: "", True: "pass", False: "FAIL"}[row["verified"]]
        print(
            f"{row['name']:<34} {row['runtime']:<11} "
            f"{row['size_bytes'] / fp32['size_bytes']:>5.2f}x {_f(row['accuracy'], 8, 4)} "
            f"{_f(row['top1_agreement'], 6, 3)} {_f(row['latency_p50_ms'], 7, 3)} "
            f"{_f(row['latency_p95_ms'], 7, 3)} {_ratio(row, fp32)} "
            f"{_f(row['throughput_rps'], 7, 0)} {row['throughput_batch'] or '':>5} "
            f"{_f(row['peak_memory_mb'], 5, 1)} {verdict}"
        )
        for note in row["notes"]:
            print(f"  note: {note}")


def _f(value: float | None, width: int, digits: int) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _ratio(row: dict[str, Any], fp32: dict[str, Any]) -> str:
    if row["latency_p50_ms"] is None:
        return f"{'—':>6}"
    return f"{row['latency_p50_ms'] / fp32['latency_p50_ms']:>5.2f}x"
