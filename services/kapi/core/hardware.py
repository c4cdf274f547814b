"""What accelerators this machine has, and which hardware profiles it can therefore run.

A profile names what a node can run: `cpu-x86_64-avx512vnni`, `cpu-x86_64-avx2`, `cpu-x86_64`,
`cpu-arm64`, `nvidia-sm<major><minor>` (from the GPU's compute capability: `nvidia-sm90`,
`nvidia-sm75`), `jetson-orin`, `intel-npu`, `edgetpu`, `rpi5`, `mcu-cortex-m0`.

The rules by which a node runs a variant (one artifact: runtime, precision, target profile):

- A variant built for profile P runs on a node that lists P; its rank is P's position in the
  node's list, lower is better. A node lists the profiles it implies explicitly, best first,
  so the CPU rules below are a lookup:
- CPU profiles are ordered supersets: `cpu-x86_64-avx512vnni` runs avx2 and baseline
  `cpu-x86_64` variants, `cpu-x86_64-avx2` runs baseline ones. `cpu-arm64` runs only arm64
  variants; `rpi5` and `jetson-orin` nodes also list `cpu-arm64`, so they run those too.
- A TensorRT variant (runtime `tensorrt`) runs only on the exact `nvidia-smXY` it was built
  for: engines are not portable. Any other variant built for `nvidia-smXY` runs on every
  `nvidia-smAB` with AB >= XY, ranked by the first such profile in the node's list.
- `mcu-cortex-m0`, `edgetpu` and `intel-npu` variants run only on exactly that profile.

`detect_profiles` reads /proc/cpuinfo, the device tree, the Jetson release file and
`nvidia-smi`. The environment variable KAPI_PROFILES (comma-separated profiles, best first)
replaces detection entirely: its list is taken as given, so it should name the implied
profiles too (`cpu-x86_64-avx2,cpu-x86_64`).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kapi.core.errors import FailedPrecondition, InvalidArgument

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one directory per GPU the driver sees
CPUINFO = Path("/proc/cpuinfo")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present on every Jetson
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=index,uuid,compute_cap", "--format=csv,noheader")
NVIDIA_SMI_TIMEOUT_S = 5.0

NAMED_PROFILES = frozenset(
    {
        "cpu-x86_64-avx512vnni",
        "cpu-x86_64-avx2",
        "cpu-x86_64",
        "cpu-arm64",
        "jetson-orin",
        "intel-npu",
        "edgetpu",
        "rpi5",
        "mcu-cortex-m0",
    }
)
_NVIDIA = re.compile(r"nvidia-sm(\d+)")
# Best first; each level implies the ones after it.
_X86_LEVELS = (("avx512_vnni", "cpu-x86_64-avx512vnni"), ("avx2", "cpu-x86_64-avx2"))


def is_known_profile(name: str) -> bool:
    """Whether `name` is one of the named profiles or an `nvidia-sm<digits>` one."""
    return name in NAMED_PROFILES or _NVIDIA.fullmatch(name) is not None


def nvidia_gpu_ids() -> list[int]:
    """The CUDA device ids a process here can use: the driver's GPUs, narrowed by
    CUDA_VISIBLE_DEVICES (numeric ids) as CUDA narrows them; [] without a driver."""
    try:
        count = sum(1 for _ in NVIDIA_GPUS.iterdir())
    except OSError:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    ids = []
    for item in visible.split(","):
        if not item.strip().isdigit() or int(item) >= count:
            break  # CUDA stops at the first id that is no device
        ids.append(int(item))
    return list(range(len(ids)))


def detect_profiles() -> list[str]:
    """The profiles this machine runs, best first: GPUs, then CPU (see the module docstring)."""
    override = os.environ.get("KAPI_PROFILES", "").strip()
    if override:
        return _parse_override(override)
    return nvidia_profiles() + cpu_profiles()


def _parse_override(value: str) -> list[str]:
    profiles = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in profiles if not is_known_profile(name)]
    if unknown:
        raise InvalidArgument(f"KAPI_PROFILES: unknown hardware profile(s) {unknown}")
    return profiles


def nvidia_profiles() -> list[str]:
    """One `nvidia-smXY` per distinct compute capability of the GPUs this process can use
    (CUDA_VISIBLE_DEVICES, by index or UUID, narrows them as CUDA does), newest first;
    [] without GPUs."""
    if shutil.which(NVIDIA_SMI[0]) is None:
        return []
    try:
        done = subprocess.run(
            NVIDIA_SMI, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return []  # a driver that does not answer is no GPU to place models on
    gpus = []
    for line in done.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 3 and fields[0].isdigit() and re.fullmatch(r"\d+\.\d", fields[2]):
            gpus.append((int(fields[0]), fields[1], int(fields[2].replace(".", ""))))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        chosen = []
        for item in (part.strip() for part in visible.split(",")):
            found = next(
                (g for g in gpus if str(g[0]) == item or (item and g[1].startswith(item))), None
            )
            if found is None or found in chosen:
                break  # CUDA stops at the first entry that names no device
            chosen.append(found)
        gpus = chosen
    sms = {sm for _, _, sm in gpus}
    return [f"nvidia-sm{sm}" for sm in sorted(sms, reverse=True)]


def cpu_profiles() -> list[str]:
    """The CPU and board profiles, best first, each followed by those it implies."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = _cpu_flags(_read(CPUINFO))
        profiles: list[str] = []
        for flag, profile in _X86_LEVELS:
            if profiles or flag in flags:  # a level implies every level after it
                profiles.append(profile)
        return [*profiles, "cpu-x86_64"]
    if machine in ("aarch64", "arm64"):
        model = _read(DEVICE_TREE_MODEL).rstrip("\x00")
        boards = []
        if TEGRA_RELEASE.exists() or "Orin" in model:
            boards.append("jetson-orin")
        if "Raspberry Pi 5" in model:
            boards.append("rpi5")
        return [*boards, "cpu-arm64"]
    return []


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def can_run(node_profiles: Sequence[str], variant_profile: str, runtime: str) -> int | None:
    """The rank (lower is better) at which a node runs a variant, or None when it cannot."""
    built_for = _nvidia_sm(variant_profile)
    if built_for is None or runtime == "tensorrt":
        return node_profiles.index(variant_profile) if variant_profile in node_profiles else None
    for rank, profile in enumerate(node_profiles):
        sm = _nvidia_sm(profile)
        if sm is not None and sm >= built_for:
            return rank
    return None


def _nvidia_sm(profile: str) -> int | None:
    match = _NVIDIA.fullmatch(profile)
    return int(match.group(1)) if match else None


def primary_profile(profiles: Sequence[str]) -> str:
    """The best of a node's profiles: the one its preferred variants are built for."""
    if not profiles:
        raise FailedPrecondition("this machine matches no hardware profile; set KAPI_PROFILES")
    return profiles[0]
