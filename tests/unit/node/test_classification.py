"""Classification results and label files on their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from kapi.core._generated.inference import model_config_pb2 as mc
from kapi.core.errors import InvalidArgument
from kapi.node.classification import classify, read_labels


def config(label_filename: str) -> mc.ModelConfig:
    text = f'name: "m" output [ {{ name: "y" label_filename: "{label_filename}" }} ]'
    return text_format.Parse(text, mc.ModelConfig())


def test_labels_are_read_line_by_line(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("zero\none\n")
    assert read_labels(tmp_path, config("labels.txt")) == {"y": ["zero", "one"]}


@pytest.mark.parametrize(
    ("name", "words"),
    [("missing.txt", "cannot be read"), ("../outside.txt", "outside the model directory")],
)
def test_a_label_file_that_cannot_be_used_fails_the_load(
    tmp_path: Path, name: str, words: str
) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (tmp_path / "outside.txt").write_text("secret\n")
    with pytest.raises(InvalidArgument, match=words):
        read_labels(model_dir, config(name))


def test_values_are_formatted_as_tritons_to_string() -> None:
    floats = classify(np.array([[0.25, 1.0]], dtype=np.float64), 2, True, ["a"])
    assert floats.tolist() == [[b"1.000000:1", b"0.250000:0:a"]]
    ints = classify(np.array([[-3, 7]], dtype=np.int64), 1, True, [])
    assert ints.tolist() == [[b"7:1"]]
