"""The sequence batcher on its own, with an inner executor that records what the model got:
controls, correlation ids (integer and string) and the state carried between requests."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.node.runtimes import Arrays
from kapi.node.scheduler import Job
from kapi.node.sequences import SequenceBatcher

CONFIG = """
name: "s"
max_batch_size: 4
sequence_batching {
  max_sequence_idle_microseconds: 60000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START bool_false_true: [ false, true ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] } ] },
    { name: "ID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING } ] }
  ]
  state [ { input_name: "S_IN" output_name: "S_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
}
"""


class Recorder:
    """The model: S_OUT = S_IN + x; records every input it was given."""

    merges = False

    def __init__(self) -> None:
        self.seen: list[Arrays] = []

    async def submit(self, job: Job) -> Arrays:
        self.seen.append(dict(job.inputs))
        total = job.inputs["S_IN"] + job.inputs["x"]
        return {"y": total, "S_OUT": total}

    async def close(self) -> None:
        pass


def job(value: int, sequence: tuple[Any, bool, bool]) -> Job:
    return Job(
        inputs={"x": np.array([[value]], dtype=np.int32)},
        outputs=["y"],
        batch_size=1,
        signature=(),
        future=asyncio.get_running_loop().create_future(),
        sequence=sequence,
    )


async def test_string_correlation_ids_and_every_kind_of_control() -> None:
    inner = Recorder()
    batcher = SequenceBatcher(text_format.Parse(CONFIG, mc.ModelConfig()), inner)

    first = await batcher.submit(job(5, ("session-a", True, False)))
    second = await batcher.submit(job(2, ("session-a", False, True)))

    assert first["y"].tolist() == [[5]]
    assert second["y"].tolist() == [[7]]  # the state carried over
    start, end = inner.seen
    assert start["START"].tolist() == [[True]]
    assert start["END"].tolist() == [[0.0]]
    assert start["ID"].tolist() == [[b"session-a"]]
    assert end["START"].tolist() == [[False]]
    assert end["END"].tolist() == [[1.0]]
    assert batcher.active == 0  # END released it


async def test_an_integer_id_for_a_string_corrid_is_refused() -> None:
    batcher = SequenceBatcher(text_format.Parse(CONFIG, mc.ModelConfig()), Recorder())
    with pytest.raises(InvalidArgument, match="correlation ids are a string"):
        await batcher.submit(job(1, (42, True, False)))
