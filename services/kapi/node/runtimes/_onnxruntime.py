"""ONNX Runtime: `model.onnx`, on the CPU here; CUDA / TensorRT providers where present."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InternalError, InvalidArgument, MissingExtra
from kapi.core.hardware import nvidia_gpu_ids
from kapi.core.tensors import NUMPY_DTYPES
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
_BF16 = "tensor(bfloat16)"
_BF16_DTYPE = NUMPY_DTYPES["BF16"]
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


class OnnxRuntime(Runtime):
    default_filename = "model.onnx"
    # Triton's onnxruntime backend reads the same names from config.pbtxt.
    parameters = frozenset({"intra_op_thread_count", "inter_op_thread_count"})
    cpu_instance_count = 2  # Triton's default for ONNX Runtime on the CPU

    @classmethod
    def gpu_ids(cls) -> list[int]:
        """NVIDIA GPUs, when this ONNX Runtime build has a GPU execution provider."""
        gpu = any(name in ort.get_available_providers() for name in _GPU_PROVIDERS)
        return nvidia_gpu_ids() if gpu else []

    @classmethod
    def default_kind(cls) -> mc.ModelInstanceGroup.Kind.ValueType:
        # Triton's KIND_AUTO: the GPU when there is one this runtime can use, else the CPU.
        return mc.ModelInstanceGroup.KIND_GPU if cls.gpu_ids() else mc.ModelInstanceGroup.KIND_CPU

    def _load(self) -> None:
        options = ort.SessionOptions()
        params = self.files.parameters
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", 0))
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", 0))
        self._session = ort.InferenceSession(
            str(self.files.path), sess_options=options, providers=self._providers()
        )
        self._string_inputs = {
            node.name for node in self._session.get_inputs() if node.type == "tensor(string)"
        }
        self._bf16_inputs = any(node.type == _BF16 for node in self._session.get_inputs())
        self._bf16_outputs = any(node.type == _BF16 for node in self._session.get_outputs())
        if self._bf16_outputs and self._string_inputs:
            raise InvalidArgument(
                f"{self.files.path}: ONNX Runtime cannot return BF16 outputs of a model with "
                "string inputs through its Python API"
            )

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
        """ONNX Runtime's numpy bridge has no bfloat16: BF16 inputs go in as OrtValues of
        their 16-bit pattern; a model with BF16 outputs runs on OrtValues throughout, and
        its BF16 outputs are copied out of ONNX Runtime's buffer."""
        if self._bf16_outputs:
            feed = {name: _to_ort_value(array) for name, array in inputs.items()}
            values = self._session.run_with_ort_values(outputs, feed)
            return {name: _from_ort_value(v) for name, v in zip(outputs, values, strict=True)}
        if self._bf16_inputs:
            inputs = {
                name: _to_ort_value(array) if array.dtype == _BF16_DTYPE else array
                for name, array in inputs.items()
            }
        results = self._session.run(outputs, dict(inputs))
        return dict(zip(outputs, results, strict=True))

    def _unload(self) -> None:
        del self._session


def _spec(node: Any) -> TensorSpec:
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
    return TensorSpec(node.name, _DATATYPES.get(node.type, node.type), shape)


def _to_ort_value(array: npt.NDArray[np.generic]) -> Any:
    dense = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d as 0-d
    if dense.dtype == _BF16_DTYPE:
        bits = dense.view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(dense)


def _from_ort_value(value: Any) -> npt.NDArray[np.generic]:
    if value.data_type() != _BF16:
        result: npt.NDArray[np.generic] = value.numpy()
        return result
    if value.device_name().lower() != "cpu":  # data_ptr would be a device address
        raise InternalError(f"a BF16 output on {value.device_name()} cannot be read back")
    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    if not count:
        return np.empty(shape, _BF16_DTYPE)
    buffer = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    bits = np.frombuffer(memoryview(buffer), dtype=np.uint16).copy()  # ORT frees its buffer
    return bits.view(_BF16_DTYPE).reshape(shape)


def _to_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
