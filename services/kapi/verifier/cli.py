"""`kapi verify VARIANT --requirements FILE`: every check of the spec on the artifact, its
report beside it; the exit status is 0 when it passes and 1 when it does not."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument


def add_commands(commands: Any) -> None:
    verify = commands.add_parser("verify", help="check a variant against its requirements")
    verify.add_argument("variant", type=Path, help="model.onnx, model.xml, or a folder of one")
    verify.add_argument("--requirements", type=Path, required=True, help="the spec (YAML/JSON)")
    verify.add_argument(
        "--dataset", help="NAME[@DIGEST] whose test split judges it (default: kapi optimize's)"
    )
    verify.add_argument(
        "--reference", type=Path, help="the fp32 model (default: kapi optimize's fp32 variant)"
    )
    verify.add_argument("--profile", help="the variant's target (default: this machine's CPU)")
    verify.add_argument("--samples", type=int, help="test samples to judge on (default: all)")
    verify.add_argument("--formal-samples", type=int, default=100, help="inputs to certify")
    verify.add_argument("--runs", type=int, default=200, help="timed runs per measurement")
    verify.add_argument("--root", type=Path, help="the datasets' root ($KAPI_DATA_ROOT)")
    verify.add_argument(
        "--report-dir", type=Path, help="where report.json and report.md go (default: beside it)"
    )
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    verify.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> None:
    from kapi.core.hardware import detect_profiles
    from kapi.core.requirements import load_requirements
    from kapi.trainer.data.store import DatasetStore
    from kapi.verifier.evidence import Holdout
    from kapi.verifier.report import markdown, verify, write_report

    spec = load_requirements(args.requirements)
    variant_dir = args.variant if args.variant.is_dir() else args.variant.parent
    name, _, version = (args.dataset or _optimized_from(variant_dir)).partition("@")
    root = args.root or Path(os.environ.get("KAPI_DATA_ROOT", "kapi-data"))
    dataset = DatasetStore(root).get(name, version or None)
    reference = args.reference or _sibling_fp32(variant_dir)
    cpu = [p for p in detect_profiles() if p.startswith("cpu-")]
    report = verify(
        args.variant,
        spec,
        Holdout.from_dataset(dataset, args.samples),
        profile=args.profile or cpu[0],
        reference=reference,
        runs=args.runs,
        formal_samples=args.formal_samples,
    )
    if args.report_dir:
        args.report_dir.mkdir(parents=True, exist_ok=True)
    as_json, as_markdown = write_report(report, args.report_dir or variant_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report), end="")
        print(f"report: {as_json} and {as_markdown}")
    failed = [c["requirement"] for c in report["checks"] if c["verdict"] != "pass"]
    if not report["passed"]:
        print(f"FAILED: {', '.join(failed) or 'no requirement applies to this variant'}")
        sys.exit(1)
    print(f"PASSED: {len(report['checks'])} requirements met")


def _optimized_from(variant_dir: Path) -> str:
    """NAME@DIGEST of the dataset `kapi optimize` judged this variant on (variants.json)."""
    table = variant_dir.parent / "variants.json"
    try:
        dataset = json.loads(table.read_text())["dataset"]
        return f"{dataset['name']}@{dataset['digest']}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            f"{variant_dir} is not in a kapi optimize folder ({table}: {exc}); "
            "name the dataset whose test split judges it with --dataset"
        ) from exc


def _sibling_fp32(variant_dir: Path) -> Path | None:
    fp32 = variant_dir.parent / "fp32" / "model.onnx"
    return fp32 if fp32.is_file() else None
