"""From the repository to Triton's layout on disk: `kapi pull`, `kapi repository export`,
and nodes that follow the repository all write models this way."""

from __future__ import annotations

import shutil
from pathlib import Path

from kapi.core.errors import NotFound
from kapi.repository import entities as ent
from kapi.repository.blobs import hex_of
from kapi.repository.client import RepositoryClient, sha256_file
from kapi.repository.layout import config_pbtxt, inside, write_config, write_version

# The runtimes a Triton-layout export can name a platform for.
EXPORT_RUNTIMES = ["onnxruntime", "openvino", "tensorrt"]


def key_of(variant: ent.VariantOut) -> tuple[str, str, str]:
    return variant.runtime, variant.precision, variant.profile


def fetch(client: RepositoryClient, resolved: ent.Resolved, cache: Path) -> Path:
    """The artifact's file in a digest-named cache (`cache/<hex>`), downloaded when it is
    not there; a file there is trusted only after its digest checks."""
    variant = resolved.variant
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / hex_of(variant.digest)
    if target.exists():
        if sha256_file(target) == variant.digest:
            return target
        target.unlink()
    return client.download(
        resolved.model.name, resolved.version.number, key_of(variant), target, variant.digest
    )


def write_model(resolved: ent.Resolved, artifact: Path, root: Path, *, pin_version: bool) -> Path:
    """Write one version of a model into a Triton-layout root from its artifact file, which
    it takes (renamed into place, or removed once extracted); with `pin_version`,
    config.pbtxt serves that version alone (else Triton's default, the latest)."""
    model_dir = inside(root, resolved.model.name)
    number = resolved.version.number
    write_version(model_dir, number, resolved.variant, artifact, move=True)
    version = number if pin_version else None
    write_config(model_dir, config_pbtxt(resolved.model, resolved.variant, version))
    if not pin_version:  # the directory is this version alone: Triton serves the latest there
        for other in model_dir.iterdir():
            if other.is_dir() and other.name.isdigit() and other.name != str(number):
                shutil.rmtree(other)
    return model_dir


def export(
    client: RepositoryClient,
    alias: str,
    root: Path,
    profiles: list[str],
    runtimes: list[str],
    models: list[str] | None = None,
) -> list[ent.Resolved]:
    """Write every model that has `alias` (or those named) as Triton's layout under root."""
    root.mkdir(parents=True, exist_ok=True)
    names = models or [m.name for m in client.models() if alias in m.aliases]
    written = []
    for name in names:
        resolved = client.resolve(name, alias, profiles, runtimes)
        cache = root / ".kapi-downloads"
        artifact = fetch(client, resolved, cache)
        write_model(resolved, artifact, root, pin_version=False)

        written.append(resolved)
    if not written:
        raise NotFound(f"no model has the alias '{alias}'")
    (root / ".kapi-downloads").rmdir()
    return written
