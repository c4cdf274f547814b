"""Datasets: sources (folders of images, CSV, NPZ, and the real datasets that ship in
packages), versions named by their content, stratified seeded splits, and preprocessing
whose statistics come from the training split alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from kapi.core.errors import InvalidArgument, NotFound
from kapi.trainer.data import sources
from kapi.trainer.data.sources import Samples, open_source
from kapi.trainer.data.store import DatasetStore
from PIL import Image

from tests.support.node import KAPI

# What sklearn-digits ingests as with the default split: a change here changes every digest.
PINNED_DIGITS_DIGEST = "sha256:fc8351a903572a7329d1f71a24c03bded09411adff3c9424b5cf7f14ce671b25"


def images(count: int, classes: int = 2, size: int = 8, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (count, size, size, 1), dtype=np.uint8)
    y = np.arange(count, dtype=np.int64) % classes
    return Samples(x, y, [f"c{i}" for i in range(classes)], description="synthetic")


def write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], fmt: str = "PNG") -> None:
    rng = np.random.default_rng(0)
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        for index, (height, width) in enumerate(shapes):
            pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
            suffix = "png" if fmt == "PNG" else "jpg"
            Image.fromarray(pixels).save(root / name / f"{index}.{suffix}", fmt)


# sources


def test_a_folder_of_class_folders_is_a_dataset(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs", {"cat": [(6, 5)] * 4, "dog": [(6, 5)] * 3})
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    samples = open_source(str(tmp_path / "imgs")).load()
    assert samples.x.shape == (7, 6, 5, 1)
    assert samples.classes == ["cat", "dog"]
    assert samples.y.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_jpeg_images_read_too(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs", {"a": [(8, 8)] * 2, "b": [(8, 8)] * 2}, fmt="JPEG")
    assert open_source(str(tmp_path / "imgs")).load().x.shape == (4, 8, 8, 1)


def test_images_of_different_sizes_are_refused_naming_two(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs", {"a": [(8, 8), (8, 8)], "b": [(8, 8), (9, 8)]})
    with pytest.raises(InvalidArgument, match=r"b/1\.png is \(9, 8, 1\).*a/0\.png is \(8, 8, 1\)"):
        open_source(str(tmp_path / "imgs")).load()


def test_a_corrupt_image_is_refused_by_name(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs", {"a": [(8, 8)] * 2, "b": [(8, 8)] * 2})
    (tmp_path / "imgs" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InvalidArgument, match=r"b/1\.png is not a readable image"):
        open_source(str(tmp_path / "imgs")).load()


def test_an_empty_or_one_class_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match="holds no PNG or JPEG images"):
        open_source(str(tmp_path / "empty")).load()
    write_folder(tmp_path / "one", {"only": [(8, 8)] * 3})
    with pytest.raises(InvalidArgument, match="one class \\('only'\\)"):
        open_source(str(tmp_path / "one")).load()


def test_npz_arrays_with_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    x = np.zeros((4, 3, 3), dtype=np.uint8)
    np.savez(path, x=x, y=np.array([0, 1, 2, 1]), classes=np.array(["a", "b"]))
    with pytest.raises(InvalidArgument, match="labels must be 0 to 1 for 2 classes"):
        open_source(str(path)).load()
    np.savez(path, x=x, y=np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(InvalidArgument, match="labels must be integers"):
        open_source(str(path)).load()
    np.savez(path, images=x, labels=np.array([0, 1, 0, 1]))
    samples = open_source(str(path)).load()
    assert (samples.x.shape, samples.classes) == ((4, 3, 3, 1), ["0", "1"])


def test_csv_rows_are_a_dataset(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,b,label\n1,2,yes\n3,4,no\n5,6,yes\n")
    samples = open_source(str(path)).load()
    assert samples.x.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert (samples.classes, samples.y.tolist()) == (["no", "yes"], [1, 0, 1])
    path.write_text("a,label\n1,yes\nx,no\n")
    with pytest.raises(InvalidArgument, match="line 3"):
        open_source(str(path)).load()
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidArgument, match="'label' column"):
        open_source(str(path)).load()


def test_an_unknown_source_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="neither one of"):
        open_source(str(tmp_path / "nothing"))


def test_scikit_learn_digits_and_the_mnist_subset_ship_in_their_wheels() -> None:
    digits = open_source("sklearn-digits").load()
    assert (digits.x.shape, digits.x.dtype, digits.x.max()) == ((1797, 8, 8, 1), np.uint8, 255)
    mnist = open_source("mnist-subset").load()
    assert mnist.x.shape == (5000, 28, 28, 1)
    assert sorted(np.unique(mnist.y).tolist()) == list(range(10))


@pytest.mark.skipif(
    not sources.FASHION_MNIST.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (make install and .ci/run add it)",
)
def test_fashion_mnist_is_full_size_with_its_own_test_split(tmp_path: Path) -> None:
    samples = open_source("fashion-mnist").load()
    assert samples.x.shape == (70_000, 28, 28, 1)
    assert samples.given_split is not None
    assert (samples.given_split == "test").sum() == 10_000
    assert np.bincount(samples.y).tolist() == [7000] * 10
    dataset, _ = DatasetStore(tmp_path).ingest("fashion", samples)
    split = dataset.arrays()[2]
    assert (split == "test").sum() == 10_000
    assert (split[samples.given_split == "test"] == "test").all()
    assert (split == "val").sum() == 6_000  # 10% of the 60,000 it gave for training
    # The training split's mean pixel: 0.2860 is the figure published for Fashion-MNIST.
    assert dataset.preprocessing.mean[0] == pytest.approx(0.286, abs=0.001)


# versions and splits


def test_the_same_data_ingested_the_same_way_is_the_same_version(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    first, new = store.ingest("synth", images(100))
    again, new_again = store.ingest("synth", images(100))
    assert (new, new_again, again.digest) == (True, False, first.digest)
    assert len(store.versions("synth")) == 1


def test_changed_data_is_a_new_version_and_the_old_stays_readable(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    first, _ = store.ingest("synth", images(100))
    changed = images(100)
    changed.x[0, 0, 0, 0] ^= 1
    second, new = store.ingest("synth", changed)
    reseeded, _ = store.ingest("synth", images(100), seed=7)
    assert new
    assert len({first.digest, second.digest, reseeded.digest}) == 3
    assert store.get("synth").digest == reseeded.digest  # the latest
    old_x, _, _ = store.get("synth", first.digest[7:19]).arrays()
    np.testing.assert_array_equal(old_x, images(100).x)


def test_splits_are_stratified_and_seeded(tmp_path: Path) -> None:
    samples = images(1000, classes=4)
    dataset, _ = DatasetStore(tmp_path).ingest("synth", samples, seed=3, val=0.2, test=0.1)
    _, y, split = dataset.arrays()
    for which, share in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
        counts = np.bincount(y[split == which], minlength=4)
        assert counts.tolist() == [round(250 * share)] * 4
    again, _ = DatasetStore(tmp_path / "other").ingest("synth", samples, seed=3, val=0.2, test=0.1)
    np.testing.assert_array_equal(again.arrays()[2], split)


def test_normalization_statistics_come_from_the_training_split_alone(tmp_path: Path) -> None:
    samples = images(200, classes=2)
    dataset, _ = DatasetStore(tmp_path).ingest("synth", samples, seed=0)
    x, _, split = dataset.arrays()
    train = x[split == "train"].astype(np.float64) / 255
    assert dataset.preprocessing.mean[0] == pytest.approx(train.mean(), rel=1e-9)
    assert dataset.preprocessing.std[0] == pytest.approx(train.std(), rel=1e-6)
    assert dataset.preprocessing.mean[0] != pytest.approx(x.astype(np.float64).mean() / 255)
    applied = dataset.preprocessing.apply(x[split == "train"])
    assert applied.shape == (len(train), 1, 8, 8)
    assert applied.mean() == pytest.approx(0.0, abs=1e-5)
    assert applied.std() == pytest.approx(1.0, abs=1e-4)


def test_resize_and_channels_are_part_of_the_preprocessing(tmp_path: Path) -> None:
    dataset, _ = DatasetStore(tmp_path).ingest("synth", images(60), resize=(16, 12), channels="rgb")
    preprocessing = dataset.preprocessing
    assert preprocessing.input_shape((8, 8, 1)) == [3, 16, 12]
    assert preprocessing.apply(dataset.arrays()[0][:5]).shape == (5, 3, 16, 12)


def test_a_failed_ingest_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DatasetStore(tmp_path)
    store.ingest("synth", images(50))

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        store.ingest("synth", images(50, seed=1))
    assert len(store.versions("synth")) == 1
    assert sorted(p.name for p in (tmp_path / "synth").iterdir()) == [
        ".lock",  # the ingest lock, empty
        store.get("synth").path.name,
        "versions.json",
    ]


def test_a_version_left_unlisted_by_a_failed_ingest_is_listed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DatasetStore(tmp_path)

    def crash(*_: object) -> None:
        raise OSError("killed between the rename and the list")

    with monkeypatch.context() as patch:
        patch.setattr(store, "_list_version", crash)
        with pytest.raises(OSError, match="killed"):
            store.ingest("synth", images(50))
    dataset, new = store.ingest("synth", images(50))
    assert not new  # its directory was in place: the same version, now listed
    assert [v["digest"] for v in store.versions("synth")] == [dataset.digest]


def _ingest_one(root: str, seed: int) -> str:
    dataset, _ = DatasetStore(Path(root)).ingest("synth", images(300, seed=seed))
    return dataset.digest


def test_concurrent_ingests_of_one_name_each_get_listed(tmp_path: Path) -> None:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        digests = pool.starmap(_ingest_one, [(str(tmp_path), seed % 3) for seed in range(6)])
    listed = [v["digest"] for v in DatasetStore(tmp_path).versions("synth")]
    assert sorted(listed) == sorted(set(digests))
    assert len(listed) == 3


def test_a_digest_is_pinned_and_covers_names_and_options(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    digits = open_source("sklearn-digits").load()
    first, _ = store.ingest("digits", digits)
    # The same bytes everywhere (little-endian, splits as codes): a digest to hold on to.
    assert first.digest == PINNED_DIGITS_DIGEST
    renamed = Samples(digits.x, digits.y, [f"d{i}" for i in range(10)])
    assert store.ingest("digits", renamed)[0].digest != first.digest
    assert store.ingest("digits", digits, resize=(16, 16))[0].digest != first.digest
    big_endian = Samples(digits.x, digits.y.astype(">i8"), digits.classes, description="x")
    assert store.ingest("digits", big_endian)[0].digest == first.digest


def test_labels_and_samples_of_the_wrong_shape_are_refused() -> None:
    x = np.zeros((4, 3, 3, 1), dtype=np.uint8)
    with pytest.raises(InvalidArgument, match=r"shape \[N\]"):
        Samples(x, np.array([[0], [1], [0], [1]]), ["a", "b"]).check()
    with pytest.raises(InvalidArgument, match="images"):
        Samples(np.zeros((4,)), np.array([0, 1, 0, 1]), ["a", "b"]).check()
    with pytest.raises(InvalidArgument, match="not a number"):
        Samples(np.array([[1.0], [np.nan]]), np.array([0, 1]), ["a", "b"]).check()
    with pytest.raises(InvalidArgument, match=r"classes \['c'\] have no samples"):
        Samples(x, np.array([0, 1, 0, 1]), ["a", "b", "c"]).check()


def test_images_that_are_not_eight_bit_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="images are 8-bit"):
        Samples(
            np.zeros((4, 3, 3, 1), dtype=np.float32), np.array([0, 1, 0, 1]), ["a", "b"]
        ).check()


def test_channels_first_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nchw.npz"
    np.savez(path, x=np.zeros((4, 1, 16, 16), dtype=np.uint8), y=np.array([0, 1, 0, 1]))
    with pytest.raises(InvalidArgument, match="channels-first"):
        open_source(str(path)).load()


def test_sixteen_bit_images_are_scaled_and_hidden_folders_are_no_classes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
        Image.fromarray(ramp).save(tmp_path / "imgs" / name / "0.png")
    (tmp_path / "imgs" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "imgs" / "a" / "notes.webp").write_bytes(b"skipped")
    samples = open_source(str(tmp_path / "imgs")).load()
    assert samples.classes == ["a", "b"]
    assert "1 other files skipped" in samples.description
    assert len(np.unique(samples.x)) == 64  # scaled, not clipped to 0 and 255
    assert samples.x.max() == round(63 * 1024 * 255 / 65535)


def test_a_bad_name_or_split_is_refused(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    with pytest.raises(InvalidArgument, match="dataset name"):
        store.ingest("Bad_Name", images(20))
    with pytest.raises(InvalidArgument, match="leave a training split"):
        store.ingest("synth", images(20), val=0.5, test=0.5)
    with pytest.raises(NotFound, match="'nothing' is not in"):
        store.get("nothing")


def test_the_command_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs", {"only": [(8, 8)] * 3})
    done = subprocess.run(
        [str(KAPI), "data", "ingest", str(tmp_path / "imgs"), "--name", "x",
         "--root", str(tmp_path / "root")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().startswith("kapi data: error: the dataset has one class")
    assert not (tmp_path / "root" / "x").exists()
