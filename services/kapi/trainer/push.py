"""A bundle into the model repository: the model (created from the bundle's signature when
it is new), a version carrying the bundle's lineage and metrics, and its ONNX model as the
fp32 ONNX Runtime variant for the baseline x86-64 CPU profile, which every x86-64 node runs.

The preprocessing and the labels travel in the version's lineage, so the optimizer (its
calibration) and a serving client read the same transform the model was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument, NotFound
from kapi.repository import entities as ent
from kapi.repository.client import RepositoryClient

BUNDLE_FILES = ("model.onnx", "signature.json", "lineage.json", "metrics.json")
VARIANT = ("onnxruntime", "fp32", "cpu-x86_64")


def push_bundle(
    client: RepositoryClient,
    model: str,
    bundle: Path,
    *,
    requirements: dict[str, Any] | None = None,
) -> tuple[int, ent.VariantOut]:
    """Push `bundle` as a new version of `model`; (version number, variant)."""
    missing = [name for name in BUNDLE_FILES if not (bundle / name).is_file()]
    if missing:
        raise InvalidArgument(f"{bundle} is not a kapi bundle: it lacks {missing}")
    signature = ent.Signature.model_validate(_json(bundle / "signature.json"))
    lineage = _json(bundle / "lineage.json")
    metrics = _json(bundle / "metrics.json")
    lineage["preprocessing"] = _json(bundle / "preprocessing.json")
    labels = bundle / "labels.txt"
    lineage["labels"] = labels.read_text().splitlines() if labels.is_file() else []
    try:
        existing = client.model(model)
    except NotFound:
        dataset = lineage.get("dataset", {}).get("name", "?")
        architecture = lineage.get("config", {}).get("model", "?")
        client.create_model(
            ent.ModelCreate(
                name=model,
                description=f"{architecture} trained on {dataset} by kapi train",
                signature=signature,
                requirements=requirements,
            )
        )
    else:
        if existing.signature is not None and existing.signature != signature:
            raise InvalidArgument(
                f"model '{model}' exists with another signature; this bundle takes "
                f"{[i.shape for i in signature.inputs]} and gives "
                f"{[o.shape for o in signature.outputs]}"
            )
    summary = {k: v for k, v in metrics.items() if k != "history"}  # the curve stays local
    version = client.create_version(model, ent.VersionCreate(lineage=lineage, metrics=summary))
    variant = client.upload(model, version.number, VARIANT, bundle / "model.onnx")
    return version.number, variant


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: {exc}") from exc
