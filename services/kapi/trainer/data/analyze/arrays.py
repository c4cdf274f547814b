"""The array types the analyses share, and the batches that bound their float copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

BATCH_VALUES = 16_000_000  # values converted to float at a time: 128 MB of float64

Array = npt.NDArray[Any]
Ints = npt.NDArray[np.int64]


def batches(x: Array, indices: Ints) -> list[Ints]:
    """The indices in runs small enough to convert to float."""
    size = max(1, BATCH_VALUES // max(1, int(np.prod(x.shape[1:]))))
    return [indices[start : start + size] for start in range(0, len(indices), size)]
