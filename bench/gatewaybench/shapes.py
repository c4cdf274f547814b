"""The two requests the gateway bench sends: one model per request on the node, each an
ONNX Identity on FP32 (so the node computes next to nothing and what is measured is the
transport), with a batch dimension: a batch-1 request is the model's shape with 1 in front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
INPUT = "INPUT0"
OUTPUT = "OUTPUT0"
DATATYPE = "FP32"


@dataclass(frozen=True, slots=True)
class Request:
    """One request kind: the model that answers it (served under the same name) and the
    shape of its single FP32 input, batch first; the output is the input."""

    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def sample(self, seed: int = 0) -> Array:
        return np.random.default_rng(seed).standard_normal(self.shape, dtype=np.float32)


REQUESTS = (Request("small", (1, 16)), Request("large", (1, 3, 224, 224)))
BY_NAME = {request.name: request for request in REQUESTS}
