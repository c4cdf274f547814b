"""What the optimizer starts from: a `kapi train` bundle (its PyTorch weights, exported
again, simplified and checked, with its parity to PyTorch recorded) or an ONNX model file
with the dataset that judges it; and the calibration set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.trainer.bundle import export_onnx
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.training import TrainConfig, build_model
from kapi.verifier.artifact import open_artifact, runner

CALIBRATION_SAMPLES = 512
EVAL_BATCH = 256
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Parity:
    max_abs_difference: float
    top1_agreement: float
    samples: int


@dataclass(frozen=True)
class Source:
    """The dataset, and the PyTorch model where the source is a bundle (pruning needs it)
    or the ONNX model where it is a file."""

    path: Path
    dataset: Dataset
    model: torch.nn.Module | None = None
    onnx: Path | None = None
    config: TrainConfig | None = None  # how the bundle was trained (fine-tuning follows it)


def open_source(path: Path, store: DatasetStore, dataset: str | None = None) -> Source:
    """A bundle folder, or an ONNX file judged on `dataset` (NAME or NAME@DIGEST)."""
    if path.is_file():
        if dataset is None:
            raise InvalidArgument(f"{path} is a model file: name the dataset that judges it")
        name, _, version = dataset.partition("@")
        artifact = open_artifact(path)  # refuses what is not a model
        return Source(path, store.get(name, version or None), onnx=artifact.path)
    return load_bundle(path, store)


def load_bundle(bundle: Path, store: DatasetStore) -> Source:
    """The bundle's PyTorch model (its state dict in the zoo's architecture), its dataset and
    its training config."""
    try:
        lineage = json.loads((bundle / "lineage.json").read_text())
        state = torch.load(bundle / "state_dict.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"{bundle} is not a kapi bundle: {exc}") from exc
    dataset = store.get(lineage["dataset"]["name"], lineage["dataset"]["digest"])
    config = TrainConfig.model_validate(lineage["config"])
    model = build_model(config, dataset)
    model.load_state_dict(state)
    return Source(bundle, dataset, model=model.eval(), config=config)


def export_simplified(model: torch.nn.Module, dataset: Dataset, path: Path) -> Parity:
    """ONNX (opset 17, dynamic batch), simplified and checked; its parity with PyTorch on the
    test split."""
    shape = dataset.preprocessing.input_shape(tuple(dataset.meta["sample_shape"]))
    raw = path.with_name(path.stem + ".raw.onnx")
    export_onnx(model, shape, raw)
    simplify(raw, path)
    raw.unlink()
    x, _ = held_out(dataset)
    with torch.no_grad():
        expected = np.concatenate(
            [
                model(torch.from_numpy(x[i : i + EVAL_BATCH])).numpy()
                for i in range(0, len(x), EVAL_BATCH)
            ]
        )
    got = runner(open_artifact(path))(x)
    return Parity(
        max_abs_difference=float(np.abs(got - expected).max()),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        samples=len(x),
    )


def simplify(source: Path, target: Path) -> None:
    """onnxslim's simplification, then strict shape inference and onnx's full checker."""
    import onnx
    import onnxslim

    check_operators(source)
    simplified = onnxslim.slim(str(source))
    simplified = onnx.shape_inference.infer_shapes(simplified, strict_mode=True)
    onnx.checker.check_model(simplified, full_check=True)
    onnx.save(simplified, str(target))


def check_operators(path: Path) -> None:
    """Refuse, by name, operators that are not ONNX's (or ONNX Runtime's own) at the model's
    opset: no kapi target runs them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    unknown = sorted(
        {
            f"{node.op_type} (domain {node.domain or 'ai.onnx'})"
            for node in model.graph.node
            if not _known(node.op_type, node.domain or "ai.onnx", opsets)
        }
    )
    if unknown:
        raise InvalidArgument(
            f"{path.name}: operator(s) {', '.join(unknown)} are not supported by any kapi "
            "target's runtime (ONNX Runtime, OpenVINO, TensorRT)"
        )


def _known(op_type: str, domain: str, opsets: dict[str, int]) -> bool:
    import onnx

    schema_domain = "" if domain == "ai.onnx" else domain
    try:
        onnx.defs.get_schema(op_type, opsets.get(domain, 1), schema_domain)
    except onnx.defs.SchemaError:
        return False
    return True


def calibration_samples(dataset: Dataset, data: Path | None = None) -> Array:
    """The calibration set, preprocessed as at serving: a seeded sample of the training
    split, or the images of a .npy file in the dataset's stored layout."""
    if data is not None:
        return _calibration_file(dataset, data)
    x, _ = dataset.split("train")
    if not len(x):
        raise FailedPrecondition(f"dataset '{dataset.name}' has no training split to calibrate on")
    chosen = np.random.default_rng(0).permutation(len(x))[:CALIBRATION_SAMPLES]
    return dataset.preprocessing.apply(x[np.sort(chosen)])


def _calibration_file(dataset: Dataset, path: Path) -> Array:
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"calibration set {path}: not a .npy array: {exc}") from exc
    expected = tuple(dataset.meta["sample_shape"])
    if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != expected or not len(images):
        raise InvalidArgument(
            f"calibration set {path}: shape {list(images.shape)}, but the dataset's samples "
            f"are {list(expected)}: expected [N, {', '.join(map(str, expected))}]"
        )
    return dataset.preprocessing.apply(images)


def held_out(dataset: Dataset) -> tuple[Array, Array]:
    """The test split, preprocessed, and its labels."""
    x, y = dataset.split("test")
    if not len(x):
        raise FailedPrecondition(f"dataset '{dataset.name}' has no test split to judge on")
    return dataset.preprocessing.apply(x), y


def validation(dataset: Dataset) -> tuple[Array, Array] | None:
    """The val split, preprocessed, and its labels; None when the dataset has none."""
    x, y = dataset.split("val")
    return (dataset.preprocessing.apply(x), y) if len(x) else None
