"""Triton's model-repository layout, written from what the repository stores:
`<model>/config.pbtxt` and `<model>/<version>/<artifact's files>`. The Triton-layout export and
nodes that follow the repository both write it; a Triton server or a kapi node serves it.

Written safely: a tar artifact's members are checked before anything is extracted (regular
files and directories only, every name inside the version directory), and a version
directory appears complete or not at all (written aside, then renamed into place).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from google.protobuf import text_format

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.repository import entities as ent

PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino",
    "tensorrt": "tensorrt_plan",
    "tflite": "tflite",
}


def config_pbtxt(model: ent.ModelOut, variant: ent.VariantOut, version: int | None = None) -> str:
    """The Triton model configuration of one variant: its platform, and the model's
    signature when it has one (without, Triton and kapi complete it from the model file).
    With `version`, a policy that serves that version alone. Built as the protobuf and
    printed by protobuf, so that no name can write fields of its own into it."""
    config = mc.ModelConfig(name=model.name, platform=PLATFORMS[variant.runtime])
    if variant.format == "file" and variant.filename != ent.DEFAULT_FILENAME[variant.runtime]:
        config.default_model_filename = variant.filename
    signature = model.signature
    if signature is not None:
        config.max_batch_size = signature.max_batch_size
        batched = signature.max_batch_size > 0
        for spec in signature.inputs:
            config.input.add(
                name=spec.name,
                data_type=_type(spec.datatype),
                dims=spec.shape[1:] if batched else spec.shape,
            )
        for spec in signature.outputs:
            config.output.add(
                name=spec.name,
                data_type=_type(spec.datatype),
                dims=spec.shape[1:] if batched else spec.shape,
            )
        if batched:
            config.dynamic_batching.SetInParent()
    if version is not None:
        config.version_policy.specific.versions.append(version)
    return text_format.MessageToString(config)


def _type(datatype: str) -> int:
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return int(mc.DataType.Value(name))


def check_member(member: tarfile.TarInfo) -> None:
    """A tar member that may be extracted into a version directory, else InvalidArgument."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise InvalidArgument(
            f"the archive member {member.name!r} points outside the version directory"
        )
    if not (member.isfile() or member.isdir()):
        raise InvalidArgument(
            f"the archive member {member.name!r} is not a regular file or a directory "
            "(links and devices are refused)"
        )


class ArchivePaths:
    """The members of one archive, checked as they come: each as check_member wants it, and
    together a tree that can be extracted (no name twice, nothing under a file's name)."""

    def __init__(self) -> None:
        self._files: set[PurePosixPath] = set()
        self._dirs: set[PurePosixPath] = set()

    def add(self, member: tarfile.TarInfo) -> None:
        check_member(member)
        path = PurePosixPath(member.name)
        if path in self._files or (member.isfile() and path in self._dirs):
            raise InvalidArgument(f"the archive member {member.name!r} is there twice")
        if any(parent in self._files for parent in path.parents):
            raise InvalidArgument(
                f"the archive member {member.name!r} is under a file of the same name"
            )
        (self._files if member.isfile() else self._dirs).add(path)
        self._dirs.update(path.parents)


def write_version(
    model_dir: Path, version: int, variant: ent.VariantOut, artifact: Path, *, move: bool = False
) -> Path:
    """Write `model_dir/<version>/` from an artifact's file, replacing what was there. With
    `move`, a one-file artifact is renamed into place rather than copied (and a tar is
    removed once extracted)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}-"))
    try:
        if variant.format == "tar":
            with tarfile.open(artifact) as tar:
                members = tar.getmembers()
                paths = ArchivePaths()
                for member in members:
                    paths.add(member)
                tar.extractall(staging, members=members, filter="data")
            if move:
                artifact.unlink()
        else:
            target = staging / ent.check_filename(variant.filename)
            if move:
                os.replace(artifact, target)
            else:
                shutil.copyfile(artifact, target)
        target = model_dir / str(version)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_config(model_dir: Path, text: str) -> None:
    """Replace config.pbtxt in one step (a node reading it sees the old or the new one)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    temp = model_dir / ".config.pbtxt.tmp"
    temp.write_text(text)
    os.replace(temp, model_dir / "config.pbtxt")


def inside(root: Path, name: str) -> Path:
    """`root/name` for a model name, refused unless it stays inside root."""
    ent.check_name("model", name)
    target = (root / name).resolve()
    if target.parent != root.resolve():
        raise InvalidArgument(f"model directory {target} is not inside {root}")
    return target
