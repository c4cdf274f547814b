"""A bundle into the model repository: the model (created from the bundle's signature when
it is new), a version carrying the bundle's lineage and metrics, and its ONNX model as the
fp32 ONNX Runtime variant for the baseline x86-64 CPU profile, which every x86-64 node runs.

The preprocessing and the labels travel in the version's lineage, so the optimizer (its
calibration) and a serving client read the same transform the model was trained with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument, KapiError, NotFound
from kapi.repository import entities as ent
from kapi.repository.client import RepositoryClient

BUNDLE_FILES = (
    "model.onnx",
    "signature.json",
    "lineage.json",
    "metrics.json",
    "preprocessing.json",
)
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
        if requirements is not None and existing.requirements != requirements:
            raise InvalidArgument(
                f"model '{model}' exists with other requirements; a push does not change a model"
            )
        if existing.signature is not None and existing.signature != signature:
            raise InvalidArgument(
                f"model '{model}' exists with another signature; this bundle takes "
                f"{[i.shape for i in signature.inputs]} and gives "
                f"{[o.shape for o in signature.outputs]}"
            )
    summary = {k: v for k, v in metrics.items() if k != "history"}  # the curve stays local
    version = client.create_version(model, ent.VersionCreate(lineage=lineage, metrics=summary))
    try:
        variant = client.upload(model, version.number, VARIANT, bundle / "model.onnx")
    except BaseException:
        with contextlib.suppress(Exception):  # an empty version would only mislead
            client.delete_version(model, version.number)
        raise
    return version.number, variant


def check_push(args: argparse.Namespace) -> None:
    """Before training: the requirements read and the repository answers with this token."""
    if not args.push:
        return
    _requirements(args)
    with (
        RepositoryClient.from_env(args.repository, args.token) as client,
        contextlib.suppress(NotFound),  # a new model: what matters is that the token works
    ):
        client.model(args.push)


def push_from_args(args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """With --push MODEL: the bundle as a new version of MODEL in the repository."""
    if not args.push:
        return {}
    with RepositoryClient.from_env(args.repository, args.token) as client:
        try:
            number, variant = push_bundle(
                client, args.push, bundle, requirements=_requirements(args)
            )
        except KapiError as exc:
            raise type(exc)(
                f"{exc.message} (the bundle is kept: kapi push {args.push} {bundle})"
            ) from exc
    if not args.json:
        print(f"pushed {args.push} version {number} to {client.url} ({variant.digest[:19]})")
    return {"pushed": {"model": args.push, "version": number, "digest": variant.digest}}


def _requirements(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.requirements is None:
        return None
    from kapi.core.requirements import load_requirements

    return load_requirements(args.requirements).model_dump(mode="json", exclude_none=True)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: {exc}") from exc
