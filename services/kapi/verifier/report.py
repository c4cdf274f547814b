"""A verification: every check of the spec run on one artifact, and its report, as JSON for
the repository's promotion gate (`passed`, and the `digest` of the artifact judged) and as
Markdown for people, both stored beside the artifact."""

from __future__ import annotations

import contextlib
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from kapi.core.files import replace_text
from kapi.core.requirements import Requirements
from kapi.verifier.artifact import open_artifact
from kapi.verifier.checks import run_checks
from kapi.verifier.evidence import Evidence, Holdout

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"


def verify(
    path: Path,
    spec: Requirements,
    tests: Holdout,
    *,
    profile: str,
    reference: Path | None = None,
    runs: int = 200,
    formal_samples: int = 100,
) -> dict[str, Any]:
    """The report on the artifact at `path`: it passes when every requirement was checked
    and met."""
    artifact = open_artifact(path)
    ref = open_artifact(reference) if reference is not None else None
    evidence = Evidence(
        artifact, tests, profile=profile, reference=ref, runs=runs, formal_samples=formal_samples
    )
    outcomes = run_checks(spec, evidence)
    return {
        "passed": bool(outcomes) and all(o.verdict == "pass" for o in outcomes),
        "digest": artifact.digest,
        "artifact": {
            "path": str(artifact.path),
            "runtime": artifact.runtime,
            "size_bytes": artifact.size_bytes,
        },
        "profile": profile,
        "reference": None if ref is None else {"path": str(ref.path), "digest": ref.digest},
        "test_set": {
            "name": tests.name,
            "digest": tests.digest,
            "samples": len(tests.images),
            "labelled": tests.labels is not None,
        },
        "requirements": spec.model_dump(mode="json", exclude_none=True),
        "checks": [asdict(o) for o in outcomes],
        "environment": _environment(artifact.runtime),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_report(report: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """report.json and report.md in `directory` (each replaced whole, never half-written)."""
    as_json, as_markdown = directory / REPORT_JSON, directory / REPORT_MARKDOWN
    replace_text(as_json, orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    replace_text(as_markdown, markdown(report))
    return as_json, as_markdown


def markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    artifact, tests = report["artifact"], report["test_set"]
    lines = [
        f"# Verification {verdict}: {Path(artifact['path']).name} for {report['profile']}",
        "",
        f"- artifact: `{artifact['path']}` ({artifact['runtime']}, {artifact['size_bytes']:,} "
        f"bytes), `{report['digest']}`",
        f"- test set: {tests['name']} ({tests['samples']:,} samples"
        + (f", `{tests['digest']}`)" if tests["digest"] else ")"),
    ]
    if report["reference"]:
        lines.append(f"- reference: `{report['reference']['path']}`")
    lines += [
        "",
        "| requirement | threshold | measured | verdict | detail |",
        "|---|---|---|---|---|",
    ]
    for row in report["checks"]:
        measured = "—" if row["measured"] is None else f"{row['measured']:.4g}"
        lines.append(
            f"| {row['requirement']} | {row['threshold']:g} | {measured} | {row['verdict']} "
            f"| {row['detail']} |"
        )
    if not report["checks"]:
        lines.append("| (the spec asks for nothing this variant can be checked on) | | | fail | |")
    return "\n".join(lines) + "\n"


def _environment(runtime: str) -> dict[str, Any]:
    from kapi import __version__

    versions = {"kapi": __version__}
    for package in (runtime, "onnx", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"python": platform.python_version(), "machine": platform.machine(), **versions}
