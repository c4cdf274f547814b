"""OpenVINO: an IR (`model.xml` + `model.bin`) compiled for the device the config names."""

from __future__ import annotations

import queue
from typing import Any

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import MissingExtra
from kapi.node.runtimes._base import Arrays, Runtime, TensorSpec

try:
    import openvino as ov
except ImportError as exc:  # pragma: no cover - depends on the image
    raise MissingExtra("openvino", "openvino") from exc

_DATATYPES = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
    "bf16": "BF16",
    "string": "BYTES",
}


class OpenVinoRuntime(Runtime):
    default_filename = "model.xml"

    def _load(self) -> None:
        core = ov.Core()
        properties: dict[str, Any] = {"NUM_STREAMS": str(self.instances)}
        threads = self.files.parameters.get("inference_num_threads")
        if threads:
            properties["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = core.compile_model(
            core.read_model(str(self.files.path)), self._device(), properties
        )
        self._outputs = {port.any_name: port for port in self._compiled.outputs}
        # One infer request per instance: a request is not safe to share between threads.
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.instances):
            self._requests.put(self._compiled.create_infer_request())

    def _device(self) -> str:
        if "device" in self.files.parameters:
            return self.files.parameters["device"]
        kinds = {group.kind for group in self.files.config.instance_group}
        return "GPU" if mc.ModelInstanceGroup.KIND_GPU in kinds else "CPU"

    def metadata(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return (
            [_spec(port) for port in self._compiled.inputs],
            [_spec(port) for port in self._compiled.outputs],
        )

    def infer(self, inputs: Arrays, outputs: list[str]) -> Arrays:
        request = self._requests.get()
        try:
            results = request.infer(inputs)
            # The request reuses its output buffers: copy before handing it back.
            return {name: results[self._outputs[name]].copy() for name in outputs}
        finally:
            self._requests.put(request)

    def _unload(self) -> None:
        del self._requests, self._compiled


def _spec(port: Any) -> TensorSpec:
    shape = tuple(-1 if dim.is_dynamic else dim.get_length() for dim in port.get_partial_shape())
    datatype = port.get_element_type().get_type_name()
    return TensorSpec(port.any_name, _DATATYPES.get(datatype, datatype), shape)
