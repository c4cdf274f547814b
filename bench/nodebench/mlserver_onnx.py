"""An MLServer runtime for ONNX models, written into the bench's MLServer repository.

MLServer ships no ONNX runtime. This one mirrors kapi's: one InferenceSession with the thread
settings from model-settings.json (`parameters.extra`), run on its own thread pool of
`instances` threads so the event loop never blocks on the model.
It runs inside MLServer's own virtual environment, not kapi's.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        extra: dict[str, Any] = self.settings.parameters.extra or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_num_threads", 0))
        options.inter_op_num_threads = int(extra.get("inter_op_num_threads", 0))
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._outputs = [node.name for node in self._session.get_outputs()]
        self._executor = ThreadPoolExecutor(int(extra.get("instances", 1)))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._session.run, self._outputs, feed)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(name, array)
                for name, array in zip(self._outputs, results, strict=True)
            ],
        )

    async def unload(self) -> bool:
        self._executor.shutdown(wait=True)
        return True
