"""`kapi optimize` on a bundle the trainer wrote from scikit-learn's digits: the export's
parity with PyTorch, ONNX Runtime's static int8 (three calibrations) and fp16, each variant
measured, and what is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnx
import pytest
from kapi.core.errors import InvalidArgument
from kapi.optimizer.source import Source, open_source
from kapi.optimizer.variants import Options, build_variants
from kapi.trainer.data.sources import open_source as open_data
from kapi.trainer.data.store import DatasetStore

from tests.support.node import KAPI


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Source, Path]:
    root = tmp_path_factory.mktemp("data")
    store = DatasetStore(root)
    store.ingest("digits", open_data("sklearn-digits").load())
    out = tmp_path_factory.mktemp("run")
    command = [str(KAPI), "train", "--dataset", "digits", "--model", "small_cnn", "--epochs"]
    command += ["8", "--root", str(root), "--out", str(out), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return open_source(out / "bundle", store), out / "bundle"


def test_variants_are_exported_compressed_and_measured(
    trained: tuple[Source, Path], tmp_path: Path
) -> None:
    source, _ = trained
    out = tmp_path / "variants"
    table = build_variants(source, out, ["ort-int8-static", "fp16"], Options(runs=50))
    assert table["parity"]["max_abs_difference"] < 1e-4
    assert table["parity"]["top1_agreement"] == 1.0
    fp32, int8, fp16 = table["variants"]
    assert [v["name"] for v in (fp32, int8, fp16)] == ["fp32", "ort-int8-static", "fp16"]
    assert fp32["accuracy"] >= 0.95
    assert int8["size_bytes"] < 0.4 * fp32["size_bytes"]  # int8 weights: a quarter, and scales
    assert int8["top1_agreement"] >= 0.95
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.02
    assert fp16["top1_agreement"] >= 0.99
    assert 0.4 < fp16["size_bytes"] / fp32["size_bytes"] < 0.6
    for row in table["variants"]:
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        model = onnx.load(str(out / row["path"]))
        onnx.checker.check_model(model)
    ops = {node.op_type for node in onnx.load(str(out / int8["path"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert json.loads((out / "variants.json").read_text()) == table
    assert [p.name for p in tmp_path.iterdir()] == ["variants"]  # no staging left


@pytest.mark.parametrize("calibration", ["entropy", "percentile"])
def test_each_calibration_gives_a_working_int8_model(
    trained: tuple[Source, Path], tmp_path: Path, calibration: str
) -> None:
    source, _ = trained
    options = Options(calibration=calibration, runs=20)
    table = build_variants(source, tmp_path / "v", ["ort-int8-static"], options)
    assert table["calibration"] == calibration
    assert table["variants"][1]["top1_agreement"] >= 0.9


def test_bad_requests_are_refused_and_leave_nothing(
    trained: tuple[Source, Path], tmp_path: Path
) -> None:
    source, _ = trained
    with pytest.raises(InvalidArgument, match="unknown optimization"):
        build_variants(source, tmp_path / "a", ["prune-magic"])
    with pytest.raises(InvalidArgument, match="unknown calibration"):
        build_variants(source, tmp_path / "b", ["ort-int8-static"], Options(calibration="x"))
    with pytest.raises(InvalidArgument, match="is not a kapi bundle"):
        open_source(tmp_path, DatasetStore(tmp_path / "none"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidArgument, match="exists already"):
        build_variants(source, tmp_path / "taken", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_kapi_optimize_prints_the_table(trained: tuple[Source, Path], tmp_path: Path) -> None:
    source, bundle = trained
    command = [
        str(KAPI),
        "optimize",
        str(bundle),
        "--root",
        str(source.dataset.path.parents[1]),
        "--out",
    ]
    done = subprocess.run(
        [*command, str(tmp_path / "v")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "ort-int8-static" in done.stdout
    assert "top-1 agreement 1.0000" in done.stdout
    done = subprocess.run(
        [
            *command,
            str(tmp_path / "w"),
            "--targets",
            "nvidia-sm90",
            "--optimizations",
            "tensorrt-fp16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    from kapi.optimizer import tensorrt

    missing = tensorrt.available()
    row = next(line for line in done.stdout.splitlines() if line.startswith("tensorrt-fp16"))
    if missing is None:  # a GPU machine with TensorRT builds it
        assert "skipped" not in row
    else:
        assert f"skipped: {missing}" in row
