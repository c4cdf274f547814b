"""ONNX Runtime: `model.onnx`, on the CPU here; CUDA / TensorRT providers where present."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, MissingExtra
from kapi.node.runtimes._base import Arrays, Runtime, TensorSpec

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the image
    raise MissingExtra("onnxruntime", "onnxruntime") from exc

_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRuntime(Runtime):
    default_filename = "model.onnx"

    def _load(self) -> None:
        options = ort.SessionOptions()
        params = self.files.parameters
        # Triton's onnxruntime backend reads the same parameter names from config.pbtxt.
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", 0))
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", 0))
        self._session = ort.InferenceSession(
            str(self.files.path), sess_options=options, providers=self._providers()
        )
        self._string_inputs = {
            node.name for node in self._session.get_inputs() if node.type == "tensor(string)"
        }

    def _providers(self) -> list[str]:
        kinds = {group.kind for group in self.files.config.instance_group}
        wants_gpu = mc.ModelInstanceGroup.KIND_CPU not in kinds or not kinds
        available = set(ort.get_available_providers())
        gpu = [name for name in _GPU_PROVIDERS if wants_gpu and name in available]
        return [*gpu, "CPUExecutionProvider"]

    def metadata(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return (
            [_spec(node) for node in self._session.get_inputs()],
            [_spec(node) for node in self._session.get_outputs()],
        )

    def prepare_input(self, name: str, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """ONNX Runtime's Python API takes string tensors as `str`: BYTES must be UTF-8."""
        if name not in self._string_inputs:
            return array
        try:
            text: npt.NDArray[np.generic] = np.vectorize(_to_str, otypes=[object])(array)
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"model '{self.files.config.name}': input '{name}' is a string tensor, its "
                f"BYTES elements must be UTF-8 text: {exc}"
            ) from exc
        return text

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        results = self._session.run(outputs, dict(inputs))
        return dict(zip(outputs, results, strict=True))

    def _unload(self) -> None:
        del self._session


def _spec(node: Any) -> TensorSpec:
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
    return TensorSpec(node.name, _DATATYPES.get(node.type, node.type), shape)


def _to_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
