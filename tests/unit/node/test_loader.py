"""Which models run their requests on the event loop: quick ones that schedule each request
alone and whose inputs have fixed sizes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.node.loader import _runs_inline
from kapi.node.runtimes import Arrays, ModelFiles, Runtime, TensorSpec


class Timed(Runtime):
    def __init__(self, seconds: float) -> None:
        super().__init__(ModelFiles(Path("."), Path("."), "model", mc.ModelConfig()), 1)
        self.seconds = seconds

    def metadata(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [], []

    def _load(self) -> None:
        pass

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        time.sleep(self.seconds)
        return {"y": np.zeros((1, 4), np.float32)}


FIXED = [TensorSpec("x", "FP32", (-1, 4))]
OUT = [TensorSpec("y", "FP32", (-1, 4))]


@pytest.mark.parametrize(
    ("config", "inputs", "seconds", "inline"),
    [
        ("max_batch_size: 4", FIXED, 0.0, True),
        ("max_batch_size: 4", FIXED, 0.002, False),  # too slow
        ("max_batch_size: 4 dynamic_batching {}", FIXED, 0.0, False),  # it batches
        ("max_batch_size: 4", [TensorSpec("x", "FP32", (-1, -1))], 0.0, False),  # sizes vary
    ],
)
async def test_which_models_run_inline(
    config: str, inputs: list[TensorSpec], seconds: float, inline: bool
) -> None:
    parsed = text_format.Parse(config, mc.ModelConfig())
    assert await _runs_inline(Timed(seconds), parsed, inputs, OUT) is inline
