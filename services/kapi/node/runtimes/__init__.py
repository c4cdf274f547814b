"""Runtimes, chosen by name. Each module imports its heavy library only when first used."""

from __future__ import annotations

import importlib

from kapi.core.errors import InvalidArgument
from kapi.node.runtimes._base import Arrays, ModelFiles, Runtime, TensorSpec, in_daemon_thread

# name -> (module, class). Triton's backend and platform names map onto these below.
RUNTIMES = {
    "onnxruntime": ("kapi.node.runtimes._onnxruntime", "OnnxRuntime"),
    "openvino": ("kapi.node.runtimes._openvino", "OpenVinoRuntime"),
    "tensorrt": ("kapi.node.runtimes._tensorrt", "TensorRtRuntime"),
}
PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "openvino": "openvino", "tensorrt_plan": "tensorrt"}
# What a version directory holds, for models whose config names no backend.
FILES = {"model.onnx": "onnxruntime", "model.xml": "openvino", "model.plan": "tensorrt"}
# The platform string reported in ModelMetadata, as Triton reports it.
PLATFORM_OF = {runtime: platform for platform, runtime in PLATFORMS.items()}


def runtime_class(name: str) -> type[Runtime]:
    """The runtime class registered under `name`; imports its module on first use."""
    try:
        module, cls = RUNTIMES[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown backend '{name}', expected one of {sorted(RUNTIMES)}"
        ) from None
    runtime: type[Runtime] = getattr(importlib.import_module(module), cls)
    return runtime


__all__ = [
    "FILES",
    "PLATFORMS",
    "PLATFORM_OF",
    "RUNTIMES",
    "Arrays",
    "ModelFiles",
    "Runtime",
    "TensorSpec",
    "in_daemon_thread",
    "runtime_class",
]
