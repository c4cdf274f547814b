"""OpenVINO: an IR (`model.xml` + `model.bin`) compiled for the device the config names."""

from __future__ import annotations

import functools
import queue
import re
from typing import Any

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument, MissingExtra
from kapi.node.runtimes._base import Arrays, Runtime, TensorSpec

try:
    import openvino as ov
except ImportError as exc:  # pragma: no cover - depends on the image
    raise MissingExtra("openvino", "openvino") from exc


@functools.cache
def _gpu_count() -> int:
    return sum(name.startswith("GPU") for name in ov.Core().available_devices)


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
    """Reads Triton's openvino backend parameters (INFERENCE_NUM_THREADS, NUM_STREAMS,
    PERFORMANCE_HINT, COMPILATION_NUM_THREADS, HINT_BF16) and kapi's own `device` (CPU,
    GPU, NPU, ...; default from the instance kind).

    An IR is computed at its own precision: OpenVINO's CPU plugin would otherwise compute
    FP32 models in BF16 on CPUs with AMX or AVX-512 BF16, and its GPU plugin in FP16, so a
    variant would not give the answers it was verified with. HINT_BF16 YES asks for BF16."""

    default_filename = "model.xml"
    parameters = frozenset(
        {"INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT"}
        | {"HINT_BF16", "device"}
    )

    def _load(self) -> None:
        core = ov.Core()
        device = self._device()
        self._compiled = core.compile_model(
            core.read_model(str(self.files.path)), device, self._properties(device)
        )
        self._outputs = {port.any_name: port for port in self._compiled.outputs}
        # One infer request per instance: a request is not safe to share between threads.
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.instances):
            self._requests.put(self._compiled.create_infer_request())

    def _properties(self, device: str) -> dict[str, Any]:
        params = self.files.parameters
        properties: dict[str, Any] = {"NUM_STREAMS": str(self.instances)}
        for name in ("INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS"):
            if name in params:
                properties[name] = _choice(name, params[name], r"\d+", "a non-negative number")
        if "NUM_STREAMS" in params:
            value = _choice(
                "NUM_STREAMS", params["NUM_STREAMS"], r"AUTO|NUMA|\d+", "AUTO/NUMA/<int>"
            )
            properties["NUM_STREAMS"] = value
        if "PERFORMANCE_HINT" in params:
            properties["PERFORMANCE_HINT"] = _choice(
                "PERFORMANCE_HINT",
                params["PERFORMANCE_HINT"],
                "LATENCY|THROUGHPUT|CUMULATIVE_THROUGHPUT",
                "LATENCY/THROUGHPUT/CUMULATIVE_THROUGHPUT",
            )
        bf16 = "HINT_BF16" in params and _choice("HINT_BF16", params["HINT_BF16"], "YES", "YES")
        if bf16:
            properties["INFERENCE_PRECISION_HINT"] = "bf16"
        elif device.split(".")[0] in ("CPU", "GPU"):
            properties["INFERENCE_PRECISION_HINT"] = "f32"
        return properties

    @classmethod
    def gpu_ids(cls) -> list[int]:
        """Intel GPUs OpenVINO sees ("GPU", or "GPU.0", "GPU.1", ...)."""
        return list(range(_gpu_count()))

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


def _choice(name: str, value: str, pattern: str, expected: str) -> str:
    """A parameter's value, upper-cased, when it matches; Triton's words when it does not."""
    if not re.fullmatch(pattern, value.strip().upper()):
        raise InvalidArgument(f"expected the parameter '{name}' to be {expected}, got {value}")
    return value.strip().upper()


def _spec(port: Any) -> TensorSpec:
    shape = tuple(-1 if dim.is_dynamic else dim.get_length() for dim in port.get_partial_shape())
    datatype = port.get_element_type().get_type_name()
    return TensorSpec(port.any_name, _DATATYPES.get(datatype, datatype), shape)
