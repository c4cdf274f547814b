"""`kapi optimize BUNDLE`: a bundle's variants, each measured, into a folder."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument


def add_commands(commands: Any) -> None:
    optimize = commands.add_parser("optimize", help="export, compress and measure a bundle")
    optimize.add_argument("bundle", type=Path, help="a kapi train bundle")
    optimize.add_argument("--out", type=Path, help="default: BUNDLE/../variants")
    optimize.add_argument(
        "--optimizations",
        default="ort-int8-static,fp16",
        help="comma-separated: ort-int8-static, fp16",
    )
    optimize.add_argument("--calibration", default="minmax", help="minmax, entropy, percentile")
    optimize.add_argument(
        "--targets", help="profiles to build for (default: this machine's CPU profile)"
    )
    optimize.add_argument("--root", type=Path, help="the datasets' root ($KAPI_DATA_ROOT)")
    optimize.add_argument("--json", action="store_true", help="JSON instead of a table")
    optimize.set_defaults(handler=_optimize)


def _optimize(args: argparse.Namespace) -> None:
    from kapi.core.hardware import detect_profiles
    from kapi.optimizer.variants import build_variants
    from kapi.trainer.data.store import DatasetStore

    here = [p for p in detect_profiles() if p.startswith("cpu-")]
    targets = args.targets.split(",") if args.targets else here[:1]
    other = [t for t in targets if t not in here]
    if other:
        raise InvalidArgument(
            f"target(s) {other}: only this machine's CPU profiles {here} are built so far "
            "(OpenVINO, TensorRT and other targets are not implemented yet)"
        )
    root = args.root or Path(os.environ.get("KAPI_DATA_ROOT", "kapi-data"))
    plugins = [p.strip() for p in args.optimizations.split(",") if p.strip()]
    out = args.out or args.bundle.parent / "variants"
    table = build_variants(
        args.bundle, DatasetStore(root), out, plugins=plugins, calibration=args.calibration
    )
    table["targets"] = targets
    if args.json:
        print(json.dumps(table, indent=2))
        return
    parity = table["parity"]
    print(
        f"exported and simplified: max |onnx - torch| {parity['max_abs_difference']:.2g}, "
        f"top-1 agreement {parity['top1_agreement']:.4f} on {parity['samples']:,} test samples"
    )
    fp32 = table["variants"][0]
    print(f"{'variant':<16} {'size':>9} {'x fp32':>7} {'accuracy':>9} {'agree':>7} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'x fp32':>7}")  # fmt: skip
    for row in table["variants"]:
        size = row["size_bytes"] / fp32["size_bytes"]
        print(
            f"{row['name']:<16} {row['size_bytes']:>9,} {size:>7.2f} "
            f"{row['accuracy']:>9.4f} {row['top1_agreement']:>7.4f} {row['latency_p50_ms']:>8.3f} "
            f"{row['latency_p95_ms']:>8.3f} {row['latency_p50_ms'] / fp32['latency_p50_ms']:>7.2f}"
        )
    print(f"variants in {out}")
