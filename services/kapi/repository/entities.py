"""What the repository's API takes and gives: pydantic models, with the names it accepts."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kapi.core.errors import InvalidArgument

# DNS-label style (RFC 1123): what a Kubernetes object, a URL path segment and a directory
# can all be named.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "tflite")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
)  # fmt: skip
# The file a version directory holds for a one-file artifact, as Triton's backends name it.
DEFAULT_FILENAME = {
    "onnxruntime": "model.onnx",
    "openvino": "model.xml",
    "tensorrt": "model.plan",
    "tflite": "model.tflite",
}


def check_name(kind: str, name: str) -> str:
    if not _DNS_LABEL.fullmatch(name):
        raise InvalidArgument(
            f"{kind} name {name!r} is not valid: 1 to 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_filename(name: str) -> str:
    if not _FILENAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"file name {name!r} is not valid: one path component of letters, digits, '.', "
            "'_' and '-'"
        )
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(Strict):
    # What ONNX exporters and Triton configs name tensors ("input.1", "onnx::Gemm_0").
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/\-]{1,255}$")]
    datatype: Literal[DATATYPES]  # type: ignore[valid-type]
    shape: list[Annotated[int, Field(ge=-1)]]  # -1: a dynamic dimension


class Signature(Strict):
    """A model's inputs and outputs. With max_batch_size > 0 the model batches, as in
    Triton: every shape starts with the batch dimension, -1."""

    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]
    max_batch_size: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _batch_dims(self) -> Signature:
        if self.max_batch_size:
            for spec in (*self.inputs, *self.outputs):
                if not spec.shape or spec.shape[0] != -1:
                    raise ValueError(
                        f"tensor {spec.name!r}: with max_batch_size {self.max_batch_size} its "
                        "shape must start with the batch dimension, -1"
                    )
        return self


class ModelCreate(Strict):
    name: str
    description: str = ""
    signature: Signature | None = None
    requirements: dict[str, Any] | None = None  # the requirements spec, as a document

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return str(_as_value_error(check_name, "model", value))


class VersionCreate(Strict):
    # Where the version came from: dataset digest, training config, HPO study and trial,
    # code version; free-form beyond those keys.
    lineage: dict[str, Any] = {}
    metrics: dict[str, Any] = {}


class AliasSet(Strict):
    version: Annotated[int, Field(ge=1)]
    # Moving `production` needs a passing verification report, unless forced.
    force: bool = False
    # Compare-and-set: the version the caller last saw the alias at (0: the alias must not
    # exist yet). A move whose expectation no longer holds is refused with 409.
    expected_version: Annotated[int, Field(ge=0)] | None = None


class Report(BaseModel):
    """A verification report: its verdict and the digest of the artifact it judged."""

    model_config = ConfigDict(extra="allow")

    passed: bool
    digest: str
    checks: list[dict[str, Any]] = []


class VariantOut(BaseModel):
    runtime: str
    precision: str
    profile: str
    digest: str
    size: int
    format: Literal["file", "tar"]
    filename: str
    benchmarks: dict[str, Any]
    report: dict[str, Any] | None
    verified: bool  # a passing report for this very digest
    created_at: datetime
    created_by: str


class VersionOut(BaseModel):
    model: str
    number: int
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    aliases: list[str]
    variants: list[VariantOut]
    created_at: datetime
    created_by: str


class ModelOut(BaseModel):
    name: str
    description: str
    signature: Signature | None
    requirements: dict[str, Any] | None
    aliases: dict[str, int]
    latest_version: int | None
    created_at: datetime
    created_by: str


class Resolved(BaseModel):
    """The variant a node with these profiles and runtimes should serve."""

    model: ModelOut
    version: VersionOut
    variant: VariantOut


class UploadOut(BaseModel):
    """Bytes kept aside by /uploads: name them with a variant upload's `upload` parameter."""

    upload: str
    digest: str
    size: int


class EventOut(BaseModel):
    id: int
    at: datetime
    actor: str
    kind: str
    model: str
    version: int | None
    detail: dict[str, Any]


def _as_value_error(check: Any, *args: Any) -> Any:
    try:
        return check(*args)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
