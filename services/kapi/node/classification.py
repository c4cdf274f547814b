"""Triton's classification extension: a requested output with `classification: k` comes
back as its top k classes, BYTES elements "<value>:<index>[:<label>]", per batch row for a
model that batches (server `classification.cc`, `infer_handler.h`).

Labels come from the output's `label_filename` in the config, a file in the model directory
with one label per line, read when the model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument

# Output datatypes Triton classifies: numbers, not FP16, BF16, BOOL or BYTES.
CLASSIFIABLE = frozenset(("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                          "INT64", "FP32", "FP64"))  # fmt: skip


def read_labels(model_dir: Path, config: mc.ModelConfig) -> dict[str, list[str]]:
    """Each output's labels, from its label file inside the model directory."""
    labels: dict[str, list[str]] = {}
    root = model_dir.resolve()
    for output in config.output:
        if not output.label_filename:
            continue
        path = (model_dir / output.label_filename).resolve()
        if not path.is_relative_to(root):
            raise InvalidArgument(
                f"model '{config.name}': output '{output.name}' label_filename "
                f"'{output.label_filename}' is outside the model directory"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(
                f"model '{config.name}': output '{output.name}' label file {path} cannot be "
                f"read: {exc}"
            ) from exc
        labels[output.name] = text.splitlines()
    return labels


def classify(
    array: npt.NDArray[Any], count: int, batching: bool, labels: list[str]
) -> npt.NDArray[np.object_]:
    """The top `count` classes of each row (of the whole tensor for a model that does not
    batch), highest first; equal values in index order."""
    rows = array.reshape(array.shape[0], -1) if batching and array.ndim else array.reshape(1, -1)
    k = min(count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    floats = array.dtype.kind == "f"
    result = np.empty((rows.shape[0], k), dtype=np.object_)
    for row, indices in enumerate(order.tolist()):
        values = rows[row, indices].tolist()
        for column, (index, value) in enumerate(zip(indices, values, strict=True)):
            text = f"{value:f}:{index}" if floats else f"{value}:{index}"  # C's to_string
            if index < len(labels):
                text += f":{labels[index]}"
            result[row, column] = text.encode()
    return result if batching else result.reshape(k)
