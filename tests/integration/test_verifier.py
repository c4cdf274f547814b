"""`kapi verify` on variants that `kapi optimize` built from a small CNN trained on digits:
every check of a spec judged on the artifact itself (its sha256 in the report), a variant
quantized with a planted broken calibration set (all-zero images) caught and refused
promotion by a real repository, and bad input refused with nothing stored."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from kapi.core.errors import InvalidArgument
from kapi.core.hardware import cpu_profiles
from kapi.core.requirements import parse_requirements
from kapi.optimizer.source import open_source
from kapi.optimizer.variants import Options, build_variants
from kapi.trainer.data.sources import open_source as open_data
from kapi.trainer.data.store import DatasetStore
from kapi.verifier.evidence import Holdout
from kapi.verifier.report import verify

from tests.conftest import RepositoryFactory
from tests.support.node import KAPI

PROFILE = cpu_profiles()[0]
SPEC: dict[str, Any] = {
    "model": "digits",
    "task": "classification",
    "accuracy": {"min": 0.9, "max_drop_vs_reference": 0.02, "min_top1_agreement": 0.95},
    "targets": [
        {
            "profile": PROFILE,
            "latency_p95_ms": 1000.0,
            "max_weights_kb": 500,
            "max_memory_mb": 4096,
        },
        {"profile": "mcu-cortex-m0", "max_weights_kb": 250},
    ],
    "robustness": {
        "gaussian_noise_std": 0.02,
        "brightness_delta": 0.05,
        "shift_pixels": 1,
        "min_accuracy": 0.5,
    },
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    DatasetStore(root).ingest("digits", open_data("sklearn-digits").load())
    return root


@pytest.fixture(scope="module")
def variants(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fp32 and int8 variants of a trained CNN, and int8 calibrated on zeros."""
    run = tmp_path_factory.mktemp("run")
    command = [str(KAPI), "train", "--dataset", "digits", "--model", "small_cnn", "--epochs"]
    command += ["8", "--root", str(root), "--out", str(run), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    source = open_source(run / "bundle", DatasetStore(root))
    build_variants(source, run / "good", ["ort-int8-static"], Options(runs=30))
    zeros = run / "zeros.npy"
    np.save(zeros, np.zeros((64, *source.dataset.meta["sample_shape"]), np.uint8))
    build_variants(
        source, run / "bad", ["ort-int8-static"], Options(calibration_data=zeros, runs=30)
    )
    return {
        "fp32": run / "good" / "fp32" / "model.onnx",
        "int8": run / "good" / "ort-int8-static" / "model.onnx",
        "broken": run / "bad" / "ort-int8-static" / "model.onnx",
        "bundle": run / "bundle",
    }


def _verify(variants: dict[str, Path], root: Path, which: str, spec: dict[str, Any]) -> Any:
    source = open_source(variants["bundle"], DatasetStore(root))
    tests = Holdout.from_dataset(source.dataset)
    return verify(
        variants[which],
        parse_requirements(spec),
        tests,
        profile=PROFILE,
        reference=variants["fp32"],
        runs=30,
    )


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["requirement"]: row for row in report["checks"]}


def test_a_good_int8_variant_passes_every_check_on_its_own_bytes(
    variants: dict[str, Path], root: Path
) -> None:
    report = _verify(variants, root, "int8", SPEC)
    checks = _checks(report)
    assert report["passed"], json.dumps(report["checks"], indent=1)
    digest = hashlib.sha256(variants["int8"].read_bytes()).hexdigest()
    assert report["digest"] == f"sha256:{digest}"
    assert report["reference"]["digest"] != report["digest"]
    assert report["test_set"]["samples"] == 180  # digits' held-out test split
    assert checks["accuracy.min"]["measured"] >= 0.9
    assert checks["accuracy.min_top1_agreement"]["measured"] >= 0.95
    weights = checks[f"targets[{PROFILE}].max_weights_kb"]
    assert weights["measured"] == pytest.approx(variants["int8"].stat().st_size / 1024)
    assert 0 < checks[f"targets[{PROFILE}].latency_p95_ms"]["measured"] < 1000
    assert checks[f"targets[{PROFILE}].max_memory_mb"]["measured"] > 0
    robustness = [row for name, row in checks.items() if name.startswith("robustness.")]
    assert len(robustness) == 3
    assert all(row["verdict"] == "pass" for row in robustness)
    assert "shift" in checks["robustness.min_accuracy @ shift_pixels=1"]["detail"]
    assert not any("mcu-cortex-m0" in name for name in checks)  # another variant's target


def test_a_planted_broken_calibration_fails_its_accuracy_gate(
    variants: dict[str, Path], root: Path
) -> None:
    report = _verify(variants, root, "broken", SPEC)
    checks = _checks(report)
    assert not report["passed"]
    assert checks["accuracy.max_drop_vs_reference"]["verdict"] == "fail"
    assert checks["accuracy.min_top1_agreement"]["verdict"] == "fail"
    assert checks["accuracy.min"]["verdict"] == "fail"


def test_what_cannot_be_measured_here_fails_rather_than_passes(
    variants: dict[str, Path], root: Path
) -> None:
    spec = SPEC | {"targets": [{"profile": "nvidia-sm90", "latency_p95_ms": 1.0}]}
    source = open_source(variants["bundle"], DatasetStore(root))
    report = verify(
        variants["int8"],
        parse_requirements(spec),
        Holdout.from_dataset(source.dataset),
        profile="nvidia-sm90",
        runs=30,
    )
    checks = _checks(report)
    assert checks["targets[nvidia-sm90].latency_p95_ms"]["verdict"] == "not measured"
    assert checks["accuracy.min_top1_agreement"]["verdict"] == "not measured"  # no reference
    assert not report["passed"]


def kapi(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KAPI), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_kapi_verify_writes_the_report_beside_the_variant_and_gates_promotion(
    variants: dict[str, Path],
    root: Path,
    tmp_path: Path,
    start_kapi_repository: RepositoryFactory,
) -> None:
    spec = tmp_path / "requirements.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    reports = {}
    for which, status in (("int8", 0), ("broken", 1)):
        done = kapi(
            "verify", variants[which], "--requirements", spec, "--root", root, "--runs", "30"
        )
        assert done.returncode == status, done.stdout + done.stderr
        assert ("PASSED" if status == 0 else "FAILED") in done.stdout
        reports[which] = variants[which].parent / "report.json"
        assert json.loads(reports[which].read_text())["passed"] is (status == 0)
        assert (variants[which].parent / "report.md").read_text().startswith("# Verification")

    repository = start_kapi_repository(tmp_path / "registry")
    env = {"KAPI_REPOSITORY_URL": repository.url, "KAPI_TOKEN": repository.admin_token}
    for version, which in ((1, "broken"), (2, "int8")):
        push = ["push", "digits", variants[which], "--runtime", "onnxruntime", "--precision"]
        push += ["int8", "--profile", PROFILE, "--report", reports[which]]
        if version == 1:
            push += ["--signature", _signature(tmp_path)]
        done = kapi(*push, env=env)
        assert done.returncode == 0, done.stderr
    refused = kapi("promote", "digits", "1", env=env)
    assert refused.returncode == 1
    assert "passing verification report" in refused.stderr
    assert kapi("promote", "digits", "2", env=env).returncode == 0


def _signature(tmp_path: Path) -> Path:
    path = tmp_path / "signature.json"
    tensor = {"datatype": "FP32"}
    signature = {
        "inputs": [tensor | {"name": "input", "shape": [-1, 1, 8, 8]}],
        "outputs": [tensor | {"name": "logits", "shape": [-1, 10]}],
        "max_batch_size": 64,
    }
    path.write_text(json.dumps(signature))
    return path


def test_bad_input_is_refused_clearly_and_nothing_is_stored(
    variants: dict[str, Path], root: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"this is not a model")
    source = open_source(variants["bundle"], DatasetStore(root))
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        verify(
            garbage, parse_requirements(SPEC), Holdout.from_dataset(source.dataset), profile=PROFILE
        )
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        open_source(garbage, DatasetStore(root), "digits")

    custom = tmp_path / "custom.onnx"
    onnx.save(_model_with_an_operator("Frobnicate", "com.example"), str(custom))
    with pytest.raises(InvalidArgument, match=r"Frobnicate \(domain com.example\) are not"):
        build_variants(open_source(custom, DatasetStore(root), "digits"), tmp_path / "x", [])
    assert not (tmp_path / "x").exists()

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((8, 28, 28, 1), np.uint8))
    out = tmp_path / "variants"
    with pytest.raises(InvalidArgument, match=r"calibration set .*shape \[8, 28, 28, 1\]"):
        build_variants(source, out, ["ort-int8-static"], Options(calibration_data=wrong))
    assert not out.exists()
    assert not list(tmp_path.glob(".variants-*"))

    for spec, message in (
        (SPEC | {"acuracy": {"min": 0.9}}, "acuracy: Extra inputs are not permitted"),
        (SPEC | {"accuracy": {"min": "high"}}, "accuracy.min: Input should be a valid number"),
        (SPEC | {"robustness": {"min_accuracy": 0.5}}, "give at least one of"),
    ):
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        done = kapi("verify", variants["int8"], "--requirements", path, "--root", root)
        assert done.returncode == 1
        assert message in done.stderr, done.stderr


def _model_with_an_operator(op_type: str, domain: str) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node(op_type, ["input"], ["logits"], domain=domain)],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets)
