"""The requirements spec: the architecture's example parses, and mistakes are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kapi.core.errors import InvalidArgument
from kapi.core.requirements import load_requirements, parse_requirements

EXAMPLE = """\
model: digits
task: classification
accuracy: {min: 0.97, max_drop_vs_reference: 0.005, min_top1_agreement: 0.99}
targets:
  - {profile: cpu-x86_64-avx512vnni, latency_p95_ms: 2.0, throughput_min_rps: 500}
  - {profile: nvidia-sm90, latency_p95_ms: 0.5}
  - {profile: mcu-cortex-m0, max_weights_kb: 250}
robustness: {gaussian_noise_std: 0.05, min_accuracy: 0.95}
formal: {epsilons: [0.01, 0.02], min_certified_fraction: 0.5}
serving: {p99_ms: 20, max_error_rate: 0.001}
rollout: {steps_percent: [5, 25, 50, 100], step_seconds: 60}
"""


def test_the_architecture_example_parses(tmp_path: Path) -> None:
    (tmp_path / "requirements.yaml").write_text(EXAMPLE)
    spec = load_requirements(tmp_path / "requirements.yaml")
    assert (spec.model, spec.task) == ("digits", "classification")
    assert [target.profile for target in spec.targets] == [
        "cpu-x86_64-avx512vnni",
        "nvidia-sm90",
        "mcu-cortex-m0",
    ]
    assert spec.targets[2].max_weights_kb == 250
    assert spec.rollout is not None
    assert spec.rollout.steps_percent == [5, 25, 50, 100]


def test_json_reads_too(tmp_path: Path) -> None:
    path = tmp_path / "requirements.json"
    path.write_text(json.dumps({"model": "digits", "task": "regression"}))
    spec = load_requirements(path)
    assert spec.targets == []
    assert spec.accuracy is None


def minimal(**sections: Any) -> dict[str, Any]:
    return {"model": "digits", "task": "classification", **sections}


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (minimal(acuracy={"min": 0.9}), "acuracy"),
        (
            minimal(targets=[{"profile": "cpu-arm64", "latency_p59_ms": 1}]),
            "targets.0.latency_p59_ms",
        ),
    ],
)
def test_an_unknown_key_is_refused(data: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"{path}: Extra inputs are not permitted"):
        parse_requirements(data)


def test_a_bad_profile_is_refused() -> None:
    data = minimal(targets=[{"profile": "cpu-arm64"}, {"profile": "nvidia-h100"}])
    with pytest.raises(InvalidArgument, match=r"targets\.1\.profile: .*'nvidia-h100'"):
        parse_requirements(data)


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ([5, 25, 50], "the last step must be 100"),
        ([5, 50, 25, 100], "strictly increase"),
        ([], "at least 1 item"),
        ([50, 100, 150], "less than or equal to 100"),
    ],
)
def test_rollout_steps_must_rise_to_100(steps: list[int], why: str) -> None:
    data = minimal(rollout={"steps_percent": steps, "step_seconds": 60})
    with pytest.raises(InvalidArgument, match=rf"rollout\.steps_percent.*{why}"):
        parse_requirements(data)


@pytest.mark.parametrize(
    "data",
    [
        minimal(accuracy={"min": 1.5}),
        minimal(targets=[{"profile": "cpu-x86_64", "latency_p95_ms": 0}]),
        minimal(targets=[{"profile": "edgetpu"}, {"profile": "edgetpu"}]),
        minimal(formal={"epsilons": [0.01, -0.02], "min_certified_fraction": 0.5}),
        {"model": "Digits_V2", "task": "classification"},
        {"model": "digits", "task": "ranking"},
        {"task": "classification"},
    ],
)
def test_values_out_of_range_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match="invalid requirements"):
        parse_requirements(data)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "requirements.yaml").write_text("- just\n- a list\n")
    with pytest.raises(InvalidArgument, match="expected a mapping"):
        load_requirements(tmp_path / "requirements.yaml")


def test_broken_yaml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "requirements.yaml").write_text("model: [digits\n")
    with pytest.raises(InvalidArgument, match="not valid YAML or JSON"):
        load_requirements(tmp_path / "requirements.yaml")
