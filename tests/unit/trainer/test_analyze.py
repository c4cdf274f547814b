"""The dataset report: class balance, statistics, exact and near duplicates, leakage across
splits, outliers, and the files it writes, on small datasets with planted findings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from kapi.core.errors import InvalidArgument
from kapi.trainer.data import analyze as analysis
from kapi.trainer.data.analyze import Report, analyze
from kapi.trainer.data.analyze.duplicates import NearPairs
from kapi.trainer.data.sources import Samples, open_source
from kapi.trainer.data.store import Dataset, DatasetStore
from PIL import Image

PER_CLASS = 30
TEST_PER_CLASS = 6


@dataclass(frozen=True)
class Planted:
    exact: tuple[int, int]  # (train, test): the same bytes
    near_leak: tuple[int, int]  # (train, test): brightened and noisy
    near_train: tuple[int, int]  # both in train: brightened
    white: int  # all white among dark images


def dark_images(rng: np.random.Generator, count: int, size: int = 16) -> npt.NDArray[np.uint8]:
    """Smooth dark images (random 8x8 fields scaled up) with a little noise: images whose
    phash, like a photograph's, rests on more than a few coefficients."""
    fields = rng.integers(0, 80, (count, 8, 8), dtype=np.uint8)
    resample = Image.Resampling.BILINEAR
    smooth = np.stack(
        [np.asarray(Image.fromarray(f).resize((size, size), resample)) for f in fields]
    )
    return np.asarray(smooth + rng.integers(0, 6, smooth.shape), dtype=np.uint8)[..., None]


def brighter(image: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    noisy = image.astype(np.int64) + 20 + rng.integers(-1, 2, image.shape)
    return np.asarray(np.clip(noisy, 0, 255), dtype=np.uint8)


def planted_images() -> tuple[Samples, Planted]:
    """Three classes of 30 dark images, the last 6 of each class the given test split."""
    rng = np.random.default_rng(0)
    x = dark_images(rng, 3 * PER_CLASS)
    y = np.repeat(np.arange(3, dtype=np.int64), PER_CLASS)
    given = np.array((["train"] * (PER_CLASS - TEST_PER_CLASS) + ["test"] * TEST_PER_CLASS) * 3)
    planted = Planted(exact=(3, 27), near_leak=(33, 58), near_train=(63, 64), white=70)
    for original, copy in (planted.exact, planted.near_leak, planted.near_train):
        assert y[original] == y[copy]
        assert given[original] == "train"
    x[planted.exact[1]] = x[planted.exact[0]]
    x[planted.near_leak[1]] = brighter(x[planted.near_leak[0]], rng)
    x[planted.near_train[1]] = brighter(x[planted.near_train[0]], rng)
    x[planted.white] = 255
    return Samples(x, y, ["a", "b", "c"], given, "planted"), planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Report, Planted]:
    root = tmp_path_factory.mktemp("analyze")
    samples, planted = planted_images()
    dataset, _ = DatasetStore(root / "store").ingest("planted", samples, val=0)
    return dataset, analyze(dataset, root / "report"), planted


def load(report: Report) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(report.json_path.read_text())
    return loaded


def test_an_exact_duplicate_across_splits_is_leakage(
    planted: tuple[Dataset, Report, Planted],
) -> None:
    _, report, plants = planted
    content = load(report)
    train, test = plants.exact
    assert content["exact_duplicates"]["groups"] == 1
    assert content["exact_duplicates"]["examples"][0]["indices"] == [train, test]
    leak = content["leakage"]["test"]
    assert leak["exact"] == 1
    assert leak["exact_indices"] == [test]
    assert {"index": test, "partner_index": train, "kind": "exact"} in leak["examples"]
    assert test not in leak["near_indices"]  # an exact duplicate is not counted twice


def test_a_brightened_noisy_copy_is_a_near_duplicate(
    planted: tuple[Dataset, Report, Planted],
) -> None:
    _, report, plants = planted
    content = load(report)
    groups = [set(g["indices"]) for g in content["near_duplicates"]["examples"]]
    assert any(set(plants.near_train) <= group for group in groups)
    assert any(set(plants.near_leak) <= group for group in groups)
    leak = content["leakage"]["test"]
    train, test = plants.near_leak
    assert test in leak["near_indices"]
    (example,) = [e for e in leak["examples"] if e["index"] == test]
    assert example["kind"] == "near"
    assert example["partner_index"] == train
    assert example["distance"] <= 4
    assert example["pixel_correlation"] >= analysis.ALIKE
    assert leak["near_alike"] >= 1


def test_the_summary_names_the_leakage(planted: tuple[Dataset, Report, Planted]) -> None:
    _, report, _ = planted
    lines = report.summary_lines()
    leak = load(report)["leakage"]["test"]
    expected = f"leakage: {leak['exact'] + leak['near']} test images duplicate training images"
    assert any(line.startswith(expected + " (exact 1, near ") for line in lines)
    assert lines[1].startswith("class balance: train 72 / test 18;")
    assert lines[-1].startswith("outliers (robust z): #70 c ")


def test_an_all_white_image_among_dark_ones_is_the_top_outlier(
    planted: tuple[Dataset, Report, Planted],
) -> None:
    _, report, plants = planted
    top = load(report)["outliers"]["top"]
    assert len(top) == analysis.TOP_OUTLIERS
    assert top[0]["index"] == plants.white


def test_class_counts_and_statistics_match_the_data(
    planted: tuple[Dataset, Report, Planted],
) -> None:
    dataset, report, _ = planted
    x, y, split = dataset.arrays()
    content = load(report)
    balance = content["class_balance"]
    for name in ("train", "test"):
        assert balance["counts"][name] == np.bincount(y[split == name]).tolist()
    assert balance["counts"]["all"] == [PER_CLASS] * 3
    assert balance["imbalance"]["all"] == 1.0
    assert set(balance["counts"]) == {"train", "test", "all"}  # no val: none was asked for
    train = x[split == "train"] / 255
    stats = content["statistics"]["train"]
    assert stats["mean"] == pytest.approx([train.mean()], abs=1e-4)
    assert stats["std"] == pytest.approx([train.std()], abs=1e-4)
    assert stats["max"] == [1.0]  # the white image


def test_the_files_are_written_and_the_page_embeds_each_plot(
    planted: tuple[Dataset, Report, Planted],
) -> None:
    _, report, _ = planted
    assert load(report)["summary"]["samples"] == 3 * PER_CLASS
    page = report.markdown_path.read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page))
    assert set(report.plots) == {"class_balance", "outliers", "samples", "leakage"}
    assert linked == {path.name for path in report.plots.values()}
    for path in report.plots.values():
        assert path.parent == report.out_dir
        assert path.read_bytes().startswith(b"\x89PNG")


def rows_samples() -> Samples:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.arange(60, dtype=np.int64) % 2
    given = np.array(["train"] * 48 + ["test"] * 12)
    x[50] = x[4]  # both class 0
    x[10, 2] = 40.0  # far from every other row
    return Samples(x, y, ["no", "yes"], given, "rows")


def test_rows_have_statistics_exact_leakage_and_no_near_duplicates(tmp_path: Path) -> None:
    dataset, _ = DatasetStore(tmp_path / "store").ingest("rows", rows_samples(), val=0)
    report = analyze(dataset, tmp_path / "report")
    content = load(report)
    assert content["near_duplicates"] is None
    assert content["leakage"]["test"]["exact_indices"] == [50]
    assert content["leakage"]["test"]["near_alike"] is None
    assert len(content["statistics"]["train"]["mean"]) == 5
    assert content["outliers"]["top"][0]["index"] == 10
    assert set(report.plots) == {"class_balance", "outliers"}
    lines = report.summary_lines()
    assert "near duplicates not searched in rows" in lines[2]
    assert "leakage: 1 test rows duplicate training rows (exact 1)" in lines
    assert "Near duplicates are not searched in rows" in report.markdown_path.read_text()


def test_band_search_finds_every_pair_within_the_threshold() -> None:
    """The pigeonhole bands against comparing all pairs, on hashes with planted neighbours."""
    rng = np.random.default_rng(2)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = [np.uint64(1) << rng.choice(64, k, replace=False).astype(np.uint64) for k in range(6)]
    near = [b ^ np.bitwise_or.reduce(flips[i % 6]) for i, b in enumerate(base[:120])]
    hashes = np.unique(np.concatenate([base, np.array(near, dtype=np.uint64)]))
    for threshold in (0, 2, 4, 7):
        found = NearPairs.find(hashes, threshold)
        bits = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        expected = {(i, j) for i, j in zip(*np.nonzero(bits <= threshold), strict=True) if i < j}
        assert set(zip(found.first.tolist(), found.second.tolist(), strict=True)) == expected


def test_a_threshold_beyond_the_search_is_refused(
    planted: tuple[Dataset, Report, Planted], tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match="near_threshold must be 0 to 16"):
        analyze(planted[0], tmp_path, near_threshold=17)


def test_scikit_learn_digits_analyze_end_to_end(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "store")
    dataset, _ = store.ingest("digits", open_source("sklearn-digits").load())
    report = analyze(dataset, tmp_path / "report")
    summary = load(report)["summary"]
    assert summary["samples"] == 1797
    assert sum(summary["splits"].values()) == 1797
    assert set(summary["leakage"]) == {"val", "test", "test_vs_val"}
    assert report.summary_lines()[0].startswith("digits sha256:")
    assert all(path.is_file() for path in report.plots.values())


def test_a_test_image_that_duplicates_a_val_image_is_leakage_too() -> None:
    from kapi.trainer.data.analyze.leakage import find_leakage

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    x[5] = x[3]  # test #5 is val #3
    split = np.array(["train", "train", "train", "val", "val", "test"])
    content = np.array([0, 1, 2, 3, 4, 3])  # ids of the distinct contents
    found = find_leakage(x, content, split, near=None)
    assert set(found) == {"val", "test", "test_vs_val"}
    assert found["test"]["exact"] == 0  # nothing of train in test
    leak = found["test_vs_val"]
    assert (leak["split"], leak["against"]) == ("test", "val")
    assert leak["exact_indices"] == [5]
    assert leak["examples"] == [{"index": 5, "partner_index": 3, "kind": "exact"}]
