"""Triton python-backend model that runs `model.onnx` (beside this file) with ONNX Runtime.

Inputs and outputs are the ones in the model's config.pbtxt (names and datatypes). Parameters
`intra_op_thread_count` and `inter_op_thread_count` (string values, default 1) set the session's
thread pools. When the dynamic batcher hands over several requests whose non-batch shapes agree,
they run as one batch and each gets its own rows back; otherwise each request runs alone.

Runs inside Triton's python backend stub (see bench/tritonpeer/README.md), not in kapi's venv.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", 1))
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", 1))
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [(i["name"], _dtype(i["data_type"])) for i in config["input"]]
        self.outputs = [(o["name"], _dtype(o["data_type"])) for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = [self._feeds(request) for request in requests]
        if len(feeds) > 1 and self.batching and _same_item_shapes(feeds):
            rows = [len(next(iter(feed.values()))) for feed in feeds]
            merged = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
            try:
                results = self._run(merged)
            except Exception as error:
                return [_error(error) for _ in requests]
            bounds = np.cumsum(rows)[:-1]
            splits = [np.split(result, bounds) for result in results]
            return [self._response([s[i] for s in splits]) for i in range(len(requests))]
        responses = []
        for feed in feeds:
            try:
                responses.append(self._response(self._run(feed)))
            except Exception as error:
                responses.append(_error(error))
        return responses

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feed = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                feed[name] = tensor.as_numpy().astype(dtype, copy=False)
        return feed

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [name for name, _ in self.outputs]
        return self.session.run(names, feed)

    def _response(self, results: list[np.ndarray]) -> Any:
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(result, dtype=dtype))
            for (name, dtype), result in zip(self.outputs, results, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _dtype(data_type: str) -> Any:
    return pb_utils.triton_string_to_numpy(data_type)


def _same_item_shapes(feeds: list[dict[str, np.ndarray]]) -> bool:
    """Every request has the same inputs, with the same shapes past the batch dimension."""
    first = feeds[0]
    return all(
        feed.keys() == first.keys()
        and all(feed[name].shape[1:] == first[name].shape[1:] for name in first)
        for feed in feeds
    )


def _error(error: Exception) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
