"""The artifact under judgement: the very file that will be served (its sha256 goes in the
report), opened in the runtime that will serve it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core.errors import InvalidArgument, MissingExtra

BATCH = 256
Logits = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Artifact:
    path: Path  # model.onnx, or an OpenVINO IR's model.xml (its .bin beside it)
    runtime: str  # "onnxruntime" or "openvino"
    digest: str  # "sha256:<hex>" of the file a node downloads
    size_bytes: int  # the weights the target must hold: .onnx, or .xml plus .bin


def open_artifact(path: Path) -> Artifact:
    """The artifact at `path` (a model.onnx or model.xml, or a folder holding one), checked to
    be a model its runtime can read."""
    path = _model_file(path)
    if path.suffix == ".xml":
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise InvalidArgument(f"{path}: an OpenVINO IR needs its weights at {weights.name}")
        _read_ir(path)
        size = path.stat().st_size + weights.stat().st_size
        return Artifact(path, "openvino", _sha256(path, weights), size)
    _check_onnx(path)
    return Artifact(path, "onnxruntime", _sha256(path), path.stat().st_size)


def runner(artifact: Artifact) -> Callable[[npt.NDArray[np.float32]], Logits]:
    """A function from a preprocessed batch to the artifact's logits, on its runtime's CPU
    device, batched so that any number of samples fits in memory."""
    if artifact.runtime == "openvino":
        # f32 as the node serves it: OpenVINO would choose bf16 on CPUs that have it
        options = {"INFERENCE_PRECISION_HINT": "f32"}
        compiled = _core().compile_model(_read_ir(artifact.path), "CPU", options)
        request = compiled.create_infer_request()

        def one(x: npt.NDArray[np.float32]) -> Logits:
            return np.asarray(request.infer({0: x})[compiled.outputs[0]], dtype=np.float32)

    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(
            str(artifact.path), providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name

        def one(x: npt.NDArray[np.float32]) -> Logits:
            return np.asarray(session.run(None, {name: x})[0], dtype=np.float32)

    def run(x: npt.NDArray[np.float32]) -> Logits:
        return np.concatenate([one(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])

    return run


def _model_file(path: Path) -> Path:
    if path.is_dir():
        found = [path / name for name in ("model.onnx", "model.xml") if (path / name).is_file()]
        if len(found) != 1:
            raise InvalidArgument(f"{path} holds no model.onnx or model.xml to verify")
        return found[0]
    if not path.is_file():
        raise InvalidArgument(f"{path}: no such artifact")
    if path.suffix not in (".onnx", ".xml"):
        raise InvalidArgument(f"{path}: kapi verifies ONNX (.onnx) and OpenVINO IR (.xml)")
    return path


def _check_onnx(path: Path) -> None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as exc:
        raise InvalidArgument(f"{path} is not a valid ONNX model: {exc}") from exc
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise InvalidArgument(f"{path} is not an ONNX model: its graph is empty")


def _core() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise MissingExtra("openvino", "openvino") from exc
    return openvino.Core()


def _read_ir(path: Path) -> Any:
    try:
        return _core().read_model(str(path))
    except RuntimeError as exc:
        raise InvalidArgument(f"{path} is not an OpenVINO IR: {exc}") from exc


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
