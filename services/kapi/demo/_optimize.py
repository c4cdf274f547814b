"""The demo's optimizer stage: the HPO stage's chosen bundle exported, quantized, pruned and
compiled (`kapi optimize`), every variant measured and verified against the model's spec;
a variant calibrated on all-zero images caught by its accuracy gate; the int8 variant
judged in full by `kapi verify` (its requirements, perturbations, formal certificates), and
the repository's promotion gate: refused for the broken variant, allowed for the good one;
and the formal verifier's certificates for stage 10's digits CNN."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

KAPI = [sys.executable, "-m", "kapi.cli"]


def optimize_stage(root: Path, dataset: str, registry: Path) -> None:
    from kapi.core.hardware import cpu_profiles
    from kapi.demo._registry import running_repository

    here = cpu_profiles()[0]
    bundle, out = root / "hpo" / "bundle", root / "optimized"
    spec = root / "optimizer-requirements.yaml"
    spec.write_text(
        f"model: {dataset}\ntask: classification\n"
        "accuracy: {max_drop_vs_reference: 0.01, min_top1_agreement: 0.95}\n"
        f"targets:\n  - profile: {here}\n    latency_p95_ms: 2.0\n    max_weights_kb: 400\n"
    )
    plugins = "ort-int8-static,fp16,openvino-fp32,openvino-int8,prune-structured,tensorrt-fp16"
    command = [
        "optimize",
        str(bundle),
        "--root",
        str(root),
        "--out",
        str(out),
        "--optimizations",
        plugins,
        "--requirements",
        str(spec),
        "--runs",
        "200",
    ]
    print(f"12. the chosen model optimized and verified:\n   kapi {' '.join(command)}")
    _show(_kapi(*command))

    zeros = root / "zeros.npy"
    shape = json.loads((out / "variants.json").read_text())["dataset"]
    sample = _sample_shape(root, shape["name"], shape["digest"])
    np.save(zeros, np.zeros((64, *sample), np.uint8))
    broken = root / "optimized-broken"
    command = [
        "optimize",
        str(bundle),
        "--root",
        str(root),
        "--out",
        str(broken),
        "--optimizations",
        "ort-int8-static",
        "--calibration-data",
        str(zeros),
        "--requirements",
        str(spec),
        "--runs",
        "100",
    ]
    print("   a planted regression: int8 calibrated on 64 all-zero images")
    _show(_kapi(*command))

    full = root / "verify-requirements.yaml"
    full.write_text(
        spec.read_text()
        + "robustness: {gaussian_noise_std: 0.02, brightness_delta: 0.05, shift_pixels: 1,"
        " min_accuracy: 0.5}\n"
    )
    for name in ("fp32", "ort-int8-static"):
        command = [
            "verify",
            str(out / name),
            "--requirements",
            str(full),
            "--root",
            str(root),
            "--runs",
            "200",
            "--report-dir",
            str(root / "verified" / name),
        ]
        print(f"   kapi {' '.join(command)}")
        _show(_kapi(*command, check=False))
    formal = root / "formal-requirements.yaml"
    formal.write_text(
        "model: digits\ntask: classification\naccuracy: {min: 0.95}\n"
        "formal: {epsilons: [0.00392, 0.00784], min_certified_fraction: 0.25}\n"
    )
    digits = root / "runs" / "digits" / "bundle" / "model.onnx"
    command = [
        "verify",
        str(digits),
        "--requirements",
        str(formal),
        "--root",
        str(root),
        "--dataset",
        "digits",
        "--formal-samples",
        "100",
        "--report-dir",
        str(root / "verified" / "digits"),
    ]
    print("   formal verification (IBP and CROWN over the ONNX graph) of stage 10's digits CNN:")
    print(f"   kapi {' '.join(command)}")
    _show(_kapi(*command, check=False))

    with running_repository(registry) as (_, env):
        for which, folder in (("good", out), ("broken", broken)):
            variant = folder / "ort-int8-static"
            pushed = _kapi(
                "push",
                dataset,
                str(variant / "model.onnx"),
                "--runtime",
                "onnxruntime",
                "--precision",
                "int8",
                "--profile",
                here,
                "--report",
                str(variant / "report.json"),
                "--json",
                env=env,
            )
            number = json.loads(pushed.stdout)["version"]
            promoted = _kapi("promote", dataset, str(number), env=env, check=False)
            verdict = "promoted" if promoted.returncode == 0 else "refused"
            reason = promoted.stderr.strip().splitlines()[-1:] if verdict == "refused" else []
            print(
                f"   {which} int8 as {dataset} version {number}: production {verdict}"
                + (f" ({reason[0]})" if reason else "")
            )


def _sample_shape(root: Path, name: str, digest: str) -> list[int]:
    from kapi.trainer.data.store import DatasetStore

    return list(DatasetStore(root).get(name, digest).meta["sample_shape"])


def _kapi(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*KAPI, *args], env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"kapi {' '.join(args)} failed:\n{done.stderr}")
    return done


def _show(done: subprocess.CompletedProcess[str]) -> None:
    for line in done.stdout.splitlines():
        print(f"     {line}")
    if done.returncode not in (0, 1):  # 1: a verdict that failed, printed above
        for line in done.stderr.splitlines()[-3:]:
            print(f"     {line}")
