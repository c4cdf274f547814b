"""TensorRT: a serialized engine (`model.plan`) on an NVIDIA GPU.

Imported only when a model asks for it; without tensorrt and a CUDA device the load fails
with a clear UNAVAILABLE error and the node keeps serving its other models. Device buffers
come from torch, which every GPU image of the node carries.
"""

from __future__ import annotations

import queue
from typing import Any

import numpy as np

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import MissingExtra, Unavailable
from kapi.core.hardware import nvidia_gpu_ids
from kapi.node.runtimes._base import Arrays, Runtime, TensorSpec

try:
    import tensorrt as trt
    import torch
except ImportError as exc:  # pragma: no cover - only on GPU images
    raise MissingExtra("tensorrt", "tensorrt") from exc

_DATATYPES = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "HALF": "FP16",
    "FLOAT": "FP32",
    "BF16": "BF16",
}


class TensorRtRuntime(Runtime):  # pragma: no cover - needs a GPU
    default_filename = "model.plan"

    @classmethod
    def default_kind(cls) -> mc.ModelInstanceGroup.Kind.ValueType:
        return mc.ModelInstanceGroup.KIND_GPU

    @classmethod
    def gpu_ids(cls) -> list[int]:
        return nvidia_gpu_ids()

    def _load(self) -> None:
        if not torch.cuda.is_available():
            raise Unavailable(f"{self.files.path}: TensorRT needs a CUDA device, none found")
        logger = trt.Logger(trt.Logger.WARNING)
        engine_bytes = self.files.path.read_bytes()
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise Unavailable(f"{self.files.path}: TensorRT could not deserialize the engine")
        self._names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        # One execution context and stream per instance: instance threads run at once, and a
        # context holds the shapes and addresses of the execution it is running.
        self._slots: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        for _ in range(self.instances):
            context = self._engine.create_execution_context()
            if context is None:  # e.g. out of device memory for one context per instance
                raise Unavailable(
                    f"{self.files.path}: TensorRT could not create an execution context for "
                    f"each of the {self.instances} instances"
                )
            stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self._slots.put((context, stream))

    def metadata(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for name in self._names:
            datatype = _DATATYPES.get(self._engine.get_tensor_dtype(name).name, "FP32")
            spec = TensorSpec(name, datatype, tuple(self._engine.get_tensor_shape(name)))
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(spec)
        return inputs, outputs

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        context, stream = self._slots.get()
        try:
            return self._execute(context, stream, inputs, outputs)
        finally:
            self._slots.put((context, stream))

    def _execute(self, context: Any, stream: Any, inputs: Arrays, outputs: list[str]) -> Arrays:
        device_tensors: dict[str, Any] = {}
        with torch.cuda.stream(stream):
            for name, array in inputs.items():
                device_tensors[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
                context.set_input_shape(name, tuple(array.shape))
                context.set_tensor_address(name, device_tensors[name].data_ptr())
            for name in self._names:
                if name in inputs:
                    continue
                shape = tuple(context.get_tensor_shape(name))
                dtype = torch.from_numpy(
                    np.empty(0, trt.nptype(self._engine.get_tensor_dtype(name)))
                )
                device_tensors[name] = torch.empty(shape, dtype=dtype.dtype, device="cuda")
                context.set_tensor_address(name, device_tensors[name].data_ptr())
            context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {name: device_tensors[name].cpu().numpy() for name in outputs}
