"""Triton's layout as the repository writes it: config.pbtxt from a signature, version
directories from artifacts, and no path that leaves the directory it is written into."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.repository import entities as ent
from kapi.repository.layout import check_member, config_pbtxt, inside, write_version

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def model(signature: dict[str, object] | None) -> ent.ModelOut:
    return ent.ModelOut(
        name="digits",
        description="",
        signature=ent.Signature.model_validate(signature) if signature else None,
        requirements=None,
        aliases={},
        latest_version=1,
        created_at=NOW,
        created_by="test",
    )


def variant(runtime: str = "onnxruntime", fmt: str = "file", filename: str = "") -> ent.VariantOut:
    return ent.VariantOut(
        runtime=runtime,
        precision="fp32",
        profile="cpu-x86_64",
        digest="sha256:" + "0" * 64,
        size=1,
        format=fmt,  # type: ignore[arg-type]
        filename=filename or ent.DEFAULT_FILENAME[runtime],
        benchmarks={},
        report=None,
        verified=False,
        created_at=NOW,
        created_by="test",
    )


def tar_of(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


def test_a_batching_signature_gives_triton_dims_without_the_batch_dimension() -> None:
    signature = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1, 1]}],
        "max_batch_size": 16,
    }
    config = text_format.Parse(config_pbtxt(model(signature), variant(), 3), mc.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == (
        "digits",
        "onnxruntime_onnx",
        16,
    )
    assert list(config.input[0].dims) == [1, 28, 28]
    assert config.output[0].data_type == mc.TYPE_STRING
    assert config.HasField("dynamic_batching")
    assert list(config.version_policy.specific.versions) == [3]


def test_without_a_signature_the_config_names_the_platform_alone() -> None:
    text = config_pbtxt(model(None), variant("openvino", "tar"))
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.platform == "openvino"
    assert not config.input
    assert not config.HasField("version_policy")


def test_a_file_named_otherwise_is_the_default_model_filename() -> None:
    config = config_pbtxt(model(None), variant(filename="net.onnx"))
    assert 'default_model_filename: "net.onnx"' in config


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (member("../evil"), "outside the version directory"),
        (member("/etc/passwd"), "outside the version directory"),
        (member("a/../../b"), "outside the version directory"),
        (member("link", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
        (member("hard", tarfile.LNKTYPE, "model.xml"), "not a regular file"),
        (member("dev", tarfile.CHRTYPE), "not a regular file"),
    ],
)
def test_archive_members_that_leave_the_version_directory_are_refused(
    bad: tarfile.TarInfo, words: str
) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_member(bad)


def test_a_bad_archive_writes_nothing(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact.tar"
    artifact.write_bytes(tar_of(member("model.xml"), member("../escape.bin")))
    with pytest.raises(InvalidArgument, match=r"escape\.bin"):
        write_version(tmp_path / "digits", 1, variant("openvino", "tar"), artifact, move=True)
    assert not (tmp_path / "escape.bin").exists()
    assert list((tmp_path / "digits").iterdir()) == []


def test_an_archive_becomes_the_version_directory(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact.tar"
    artifact.write_bytes(tar_of(member("model.xml"), member("weights/model.bin")))
    written = write_version(tmp_path / "digits", 2, variant("openvino", "tar"), artifact, move=True)
    assert not artifact.exists()
    assert written == tmp_path / "digits" / "2"
    assert sorted(str(p.relative_to(written)) for p in written.rglob("*")) == [
        "model.xml",
        "weights",
        "weights/model.bin",
    ]


def test_a_file_artifact_is_moved_or_copied_into_place(tmp_path: Path) -> None:
    artifact = tmp_path / "blob"
    artifact.write_bytes(b"onnx")
    copied = write_version(tmp_path / "digits", 1, variant(), artifact)
    assert (copied / "model.onnx").read_bytes() == b"onnx"
    assert artifact.exists()
    moved = write_version(tmp_path / "digits", 2, variant(), artifact, move=True)
    assert (moved / "model.onnx").read_bytes() == b"onnx"
    assert not artifact.exists()


@pytest.mark.parametrize("name", ["..", "../other", "a/b", "UPPER", ""])
def test_export_targets_stay_inside_the_export_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        inside(tmp_path, name)
    assert inside(tmp_path, "digits") == (tmp_path / "digits").resolve()


def test_a_tensor_name_cannot_write_fields_of_its_own_into_the_config() -> None:
    """A name is data: quotes and braces in it stay inside its string."""
    sneaky = 'x", data_type: TYPE_FP32, dims: [4] } ] backend: "python" input [ { name: "z'
    signature = ent.Signature.model_construct(
        inputs=[ent.TensorSpec.model_construct(name=sneaky, datatype="FP32", shape=[4])],
        outputs=[
            ent.TensorSpec.model_construct(name="y\nbackend: 'python'", datatype="FP32", shape=[4])
        ],
        max_batch_size=0,
    )
    text = config_pbtxt(model(None).model_copy(update={"signature": signature}), variant())
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.backend == ""
    assert [i.name for i in config.input] == [sneaky]
    assert [o.name for o in config.output] == ["y\nbackend: 'python'"]


@pytest.mark.parametrize("name", ['a"b', "a b", "a\nb", "", "x" * 256])
def test_a_signature_refuses_tensor_names_that_are_no_names(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        ent.TensorSpec(name=name, datatype="FP32", shape=[1])
