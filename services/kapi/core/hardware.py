"""What accelerators this machine has, as the services need to know it."""

from __future__ import annotations

import os
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one directory per GPU the driver sees


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
