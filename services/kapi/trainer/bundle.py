"""A trained model's bundle: one directory with everything the repository and the optimizer
need, written into a temporary sibling and renamed into place, so that a failed or cancelled
write leaves nothing visible:

    model.onnx          opset 17, input "input" [batch, C, H, W], output "logits" [batch, K]
    signature.json      the repository's Signature of it
    preprocessing.json  what turns raw samples into "input"
    labels.txt          the class names, one a line, in logit order
    metrics.json        test and best val accuracy, epochs run, the per-epoch history
    lineage.json        dataset name and digest, config, seed, code version
    state_dict.pt       the PyTorch weights
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kapi.core.errors import AlreadyExists, InternalError
from kapi.trainer.data.store import Dataset
from kapi.trainer.training import Result, TrainConfig

OPSET = 17
MAX_BATCH_SIZE = 64
CHECK_SAMPLES = 8
TOLERANCE = 1e-4  # onnxruntime against torch, absolute, on the logits


def write_bundle(
    result: Result,
    dataset: Dataset,
    config: TrainConfig,
    target: Path,
    *,
    hpo: dict[str, Any] | None = None,
) -> Path:
    """The bundle at `target`, which must not exist yet; `hpo` names the study and trial."""
    if target.exists():
        raise AlreadyExists(f"{target} exists already; a bundle is written only once")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from a serving user
        _write(result, dataset, config, staging, hpo)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write(
    result: Result,
    dataset: Dataset,
    config: TrainConfig,
    folder: Path,
    hpo: dict[str, Any] | None,
) -> None:
    model = copy.deepcopy(result.model).cpu().eval()
    export_onnx(model, result.input_shape, folder / "model.onnx")
    check_onnx(model, folder / "model.onnx", _check_inputs(dataset))
    _write_json(folder / "signature.json", signature(result))
    _write_json(folder / "preprocessing.json", dataset.preprocessing.model_dump(mode="json"))
    (folder / "labels.txt").write_text("".join(f"{name}\n" for name in dataset.classes))
    _write_json(folder / "metrics.json", _metrics(result))
    _write_json(folder / "lineage.json", _lineage(dataset, config, hpo))
    torch.save(model.state_dict(), folder / "state_dict.pt")


def export_onnx(model: torch.nn.Module, input_shape: list[int], path: Path) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, *input_shape),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def check_onnx(model: torch.nn.Module, path: Path, inputs: np.ndarray[Any, Any]) -> None:
    """The ONNX model is valid and onnxruntime's logits match torch's (InternalError if not)."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": inputs})
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    difference = float(np.abs(got - expected).max()) if inputs.size else 0.0
    if not difference <= TOLERANCE:
        raise InternalError(
            f"the exported {path.name} differs from the PyTorch model by {difference:.3g} "
            f"on {len(inputs)} test samples (more than {TOLERANCE})"
        )


def signature(result: Result) -> dict[str, Any]:
    """The repository's Signature (kapi.repository.entities) of model.onnx."""
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *result.input_shape]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, result.num_classes]}],
        "max_batch_size": MAX_BATCH_SIZE,
    }


def code_version() -> str:
    """The git commit this code is checked out at, else the installed package's version."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"kapi {metadata.version('kapi')}"


def _check_inputs(dataset: Dataset) -> np.ndarray[Any, Any]:
    x, _ = dataset.split("test")
    if not len(x):
        x, _ = dataset.split("val")
    return dataset.preprocessing.apply(x[:CHECK_SAMPLES])


def _metrics(result: Result) -> dict[str, Any]:
    return {
        "test_accuracy": result.test_accuracy,
        "best_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "device": result.device,
        "history": [metrics.model_dump() for metrics in result.history],
    }


def _lineage(dataset: Dataset, config: TrainConfig, hpo: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "dataset": {"name": dataset.name, "digest": dataset.digest},
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "hpo": hpo,
    }


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
