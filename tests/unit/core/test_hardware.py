"""Hardware profiles: detection from fake /proc files and a fake nvidia-smi, and the rules."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from kapi.core import hardware
from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.core.hardware import can_run, detect_profiles, primary_profile

X86_AVX512_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\nCPU architecture: 8\n"


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A machine with no GPU, no device tree, no Jetson file and no override."""
    monkeypatch.delenv("KAPI_PROFILES", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hardware, "NVIDIA_GPUS", tmp_path / "no-driver")
    monkeypatch.setattr(hardware, "DEVICE_TREE_MODEL", tmp_path / "no-device-tree")
    monkeypatch.setattr(hardware, "TEGRA_RELEASE", tmp_path / "no-tegra-release")
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path


def set_cpu(machine: Path, monkeypatch: pytest.MonkeyPatch, arch: str, cpuinfo: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: arch)
    (machine / "cpuinfo").write_text(cpuinfo)


def add_gpus(machine: Path, compute_caps: str) -> None:
    """A driver directory with one entry per GPU, and an nvidia-smi that prints their index,
    UUID (GPU-0000…, GPU-1111…) and compute capability as its CSV query does."""
    lines = []
    for index, cap in enumerate(compute_caps.split("\\n")):
        if cap:
            (machine / "no-driver" / f"0000:0{index}:00.0").mkdir(parents=True)
            lines.append(f"{index}, GPU-{str(index) * 8}-aaaa, {cap}")
    smi = machine / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    quoted = " ".join(f"'{line}'" for line in lines)
    smi.write_text(f"#!/bin/sh\nprintf '%s\\n' {quoted}\n")  # builtins only: PATH is bare
    smi.chmod(0o755)


def test_avx512_vnni_lists_the_levels_it_implies(
    fake_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_cpu(fake_machine, monkeypatch, "x86_64", X86_AVX512_VNNI)
    assert detect_profiles() == ["cpu-x86_64-avx512vnni", "cpu-x86_64-avx2", "cpu-x86_64"]


def test_avx2_only(fake_machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_cpu(fake_machine, monkeypatch, "x86_64", X86_AVX2)
    assert detect_profiles() == ["cpu-x86_64-avx2", "cpu-x86_64"]


def test_raspberry_pi_5(fake_machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_cpu(fake_machine, monkeypatch, "aarch64", ARM64)
    (fake_machine / "no-device-tree").write_text("Raspberry Pi 5 Model B Rev 1.0\x00")
    assert detect_profiles() == ["rpi5", "cpu-arm64"]


def test_jetson_by_its_release_file(fake_machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_cpu(fake_machine, monkeypatch, "aarch64", ARM64)
    (fake_machine / "no-tegra-release").write_text("# R36 (release), REVISION: 4.0\n")
    assert detect_profiles() == ["jetson-orin", "cpu-arm64"]


def test_jetson_by_its_device_tree(fake_machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_cpu(fake_machine, monkeypatch, "aarch64", ARM64)
    (fake_machine / "no-device-tree").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert detect_profiles() == ["jetson-orin", "cpu-arm64"]


def test_gpus_come_first_newest_first(fake_machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_cpu(fake_machine, monkeypatch, "x86_64", X86_AVX2)
    add_gpus(fake_machine, "7.5\\n9.0\\n9.0\\n")
    assert detect_profiles() == ["nvidia-sm90", "nvidia-sm75", "cpu-x86_64-avx2", "cpu-x86_64"]


@pytest.mark.parametrize("visible", ["1", "GPU-11111111", "1,0,0"])
def test_cuda_visible_devices_narrows_the_gpu_profiles(
    fake_machine: Path, monkeypatch: pytest.MonkeyPatch, visible: str
) -> None:
    set_cpu(fake_machine, monkeypatch, "x86_64", X86_AVX2)
    add_gpus(fake_machine, "9.0\\n7.5\\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    expected = ["nvidia-sm75", "nvidia-sm90"] if visible.startswith("1,0") else ["nvidia-sm75"]
    assert [p for p in detect_profiles() if p.startswith("nvidia")] == sorted(
        expected, reverse=True
    )


def test_no_gpu_profile_when_cuda_hides_every_gpu(
    fake_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_cpu(fake_machine, monkeypatch, "x86_64", X86_AVX2)
    add_gpus(fake_machine, "9.0\\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_profiles() == ["cpu-x86_64-avx2", "cpu-x86_64"]


def test_failing_nvidia_smi_means_no_gpu(
    fake_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_cpu(fake_machine, monkeypatch, "x86_64", X86_AVX2)
    add_gpus(fake_machine, "9.0\\n")
    (fake_machine / "bin" / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    assert detect_profiles() == ["cpu-x86_64-avx2", "cpu-x86_64"]


def test_kapi_profiles_replaces_detection(
    fake_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_cpu(fake_machine, monkeypatch, "x86_64", X86_AVX512_VNNI)
    monkeypatch.setenv("KAPI_PROFILES", " edgetpu, cpu-arm64 ")
    assert detect_profiles() == ["edgetpu", "cpu-arm64"]


def test_kapi_profiles_refuses_an_unknown_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAPI_PROFILES", "cpu-x86_64,nvidia-h100")
    with pytest.raises(InvalidArgument, match="nvidia-h100"):
        detect_profiles()


def test_this_machine_ends_with_baseline_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAPI_PROFILES", raising=False)
    profiles = detect_profiles()
    assert profiles[-1] == "cpu-x86_64"
    assert primary_profile(profiles) == profiles[0]


X86_VNNI_NODE = ["cpu-x86_64-avx512vnni", "cpu-x86_64-avx2", "cpu-x86_64"]
GPU_NODE = ["nvidia-sm90", "nvidia-sm75", "cpu-x86_64-avx2", "cpu-x86_64"]


@pytest.mark.parametrize(
    ("node", "variant", "runtime", "rank"),
    [
        (GPU_NODE, "nvidia-sm90", "tensorrt", 0),  # TensorRT on exactly its GPU
        (GPU_NODE, "nvidia-sm75", "tensorrt", 1),
        (GPU_NODE, "nvidia-sm80", "tensorrt", None),  # engines are not portable
        (GPU_NODE, "nvidia-sm80", "onnxruntime", 0),  # ONNX runs on a newer GPU
        (GPU_NODE, "nvidia-sm75", "onnxruntime", 0),  # ... best on the newest
        (["nvidia-sm75"], "nvidia-sm90", "onnxruntime", None),  # never on an older one
        (GPU_NODE, "cpu-x86_64", "onnxruntime", 3),
        (X86_VNNI_NODE, "cpu-x86_64-avx512vnni", "onnxruntime", 0),  # CPU supersets
        (X86_VNNI_NODE, "cpu-x86_64-avx2", "openvino", 1),
        (X86_VNNI_NODE, "cpu-x86_64", "onnxruntime", 2),
        (["cpu-x86_64-avx2", "cpu-x86_64"], "cpu-x86_64-avx512vnni", "onnxruntime", None),
        (["mcu-cortex-m0"], "mcu-cortex-m0", "tflite-micro", 0),  # mcu exactly
        (X86_VNNI_NODE, "mcu-cortex-m0", "tflite-micro", None),
        (X86_VNNI_NODE, "edgetpu", "tflite", None),
        (["rpi5", "cpu-arm64"], "cpu-arm64", "onnxruntime", 1),  # boards run arm64
        (["rpi5", "cpu-arm64"], "cpu-x86_64", "onnxruntime", None),  # arm refuses x86
        (X86_VNNI_NODE, "cpu-arm64", "onnxruntime", None),  # and x86 refuses arm
    ],
)
def test_can_run(node: list[str], variant: str, runtime: str, rank: int | None) -> None:
    assert can_run(node, variant, runtime) == rank


def test_primary_profile_of_nothing_is_an_error() -> None:
    with pytest.raises(FailedPrecondition, match="KAPI_PROFILES"):
        primary_profile([])
