"""A request's path through a model version: checked before decoding, and decoded off the
event loop when it is large."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.core.inference import EncodedTensor, InferenceRequest
from kapi.core.tensors import Tensor, serialize_bytes, to_raw
from kapi.node import model as model_module
from kapi.node.model import OFF_LOOP_BYTES, ModelVersion
from kapi.node.runtimes import Arrays, ModelFiles, Runtime, TensorSpec
from kapi.node.stats import ModelStats, NodeMetrics
from prometheus_client import CollectorRegistry

CONFIG = """
name: "echo" max_batch_size: 0
input [ { name: "text" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "text" data_type: TYPE_STRING dims: [ -1 ] } ]
"""


class EchoRuntime(Runtime):
    """Returns its input; records which thread converted each input."""

    def __init__(self, config: mc.ModelConfig) -> None:
        super().__init__(ModelFiles(Path("."), Path("."), "model", config), 1)
        self.prepared_on: list[threading.Thread] = []
        self.prepared = 0

    def metadata(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [], []

    def _load(self) -> None:
        pass

    def prepare_input(self, name: str, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        self.prepared_on.append(threading.current_thread())
        self.prepared += 1
        return array

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        return {"text": inputs["text"]}


def bytes_request(count: int, element: bytes = b"ab") -> InferenceRequest:
    raw = serialize_bytes(np.array([element] * count, dtype=np.object_))
    tensor = EncodedTensor("text", "BYTES", (count,), raw)
    return InferenceRequest("echo", inputs=[tensor])


def echo_model() -> ModelVersion:
    """Made inside each test: its instance thread hands results to the running loop."""
    config = text_format.Parse(CONFIG, mc.ModelConfig())
    stats = ModelStats(NodeMetrics(CollectorRegistry()), "echo", "1")
    return ModelVersion(config, 1, "onnxruntime", EchoRuntime(config), stats)


async def test_a_small_request_decodes_on_the_loop() -> None:
    echo = echo_model()
    response = await echo.infer(bytes_request(4))
    assert response.outputs[0].data.tolist() == [b"ab"] * 4
    assert isinstance(echo.runtime, EchoRuntime)
    assert echo.runtime.prepared_on == [threading.current_thread()]
    await echo.unload(1.0)


async def test_a_large_request_decodes_off_the_loop() -> None:
    echo = echo_model()
    count = OFF_LOOP_BYTES // 6 + 1  # 6 bytes on the wire per element
    response = await echo.infer(bytes_request(count))
    assert len(response.outputs[0].data) == count
    assert isinstance(echo.runtime, EchoRuntime)
    (thread,) = echo.runtime.prepared_on
    assert thread is not threading.current_thread()
    await echo.unload(1.0)


async def test_a_request_that_fails_its_checks_is_never_decoded() -> None:
    echo = echo_model()
    request = bytes_request(4)
    request.inputs[0].datatype = "FP32"
    with pytest.raises(InvalidArgument, match="has datatype FP32, expected BYTES"):
        await echo.infer(request)
    assert isinstance(echo.runtime, EchoRuntime)
    assert echo.runtime.prepared == 0
    await echo.unload(1.0)


async def test_large_typed_contents_decode_off_the_loop() -> None:
    """fp32_contents and the like convert value by value: a large one must not hold up the
    loop either."""
    config = text_format.Parse(
        'name: "echo" input [ { name: "text" data_type: TYPE_FP32 dims: [ -1 ] } ] '
        'output [ { name: "text" data_type: TYPE_FP32 dims: [ -1 ] } ]',
        mc.ModelConfig(),
    )
    runtime = EchoRuntime(config)
    stats = ModelStats(NodeMetrics(CollectorRegistry()), "echo", "1")
    model = ModelVersion(config, 1, "onnxruntime", runtime, stats)
    count = OFF_LOOP_BYTES // 8 + 1
    values = [float(v) for v in range(count)]
    request = InferenceRequest(
        "echo", inputs=[EncodedTensor("text", "FP32", (count,), None, values)]
    )
    response = await model.infer(request)
    np.testing.assert_array_equal(response.outputs[0].data, np.arange(count, dtype=np.float32))
    (thread,) = runtime.prepared_on
    assert thread is not threading.current_thread()
    await model.unload(1.0)


async def test_large_bytes_outputs_encode_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BYTES output is encoded element by element: a large one must not hold up the loop
    (nor must working out its size for the message limit)."""
    encoded_on: list[threading.Thread] = []

    def recording_to_raw(tensor: Tensor) -> bytes:
        encoded_on.append(threading.current_thread())
        return to_raw(tensor)

    monkeypatch.setattr(model_module, "to_raw", recording_to_raw)
    echo = echo_model()
    small = await echo.infer(bytes_request(4), max_response_bytes=2**20)
    large = await echo.infer(bytes_request(OFF_LOOP_BYTES), max_response_bytes=2**30)
    await echo.unload(1.0)

    assert small.outputs[0].raw == serialize_bytes(np.array([b"ab"] * 4, dtype=np.object_))
    assert large.outputs[0].raw is not None
    assert len(large.outputs[0].raw) == 6 * OFF_LOOP_BYTES
    assert encoded_on[0] is threading.current_thread()
    assert encoded_on[1] is not threading.current_thread()
