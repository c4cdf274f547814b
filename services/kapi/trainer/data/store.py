"""Datasets, versioned and content-addressed.

A version's digest is the sha256 of its samples, its labels, its split and its preprocessing
options (with the class names): ingesting the same data the same way gives the same
version, and changed data gives a new one, while the old stays readable. A version is
written into a temporary directory and renamed into place, so a failed or cancelled ingest
leaves nothing half-written:

    ROOT/<name>/<first 16 hex digits of the digest>/arrays.npz   x, y, split
    ROOT/<name>/<...>/meta.json                                    classes, counts, preprocessing
    ROOT/<name>/versions.json                                      the versions, oldest first
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kapi.core.errors import InvalidArgument, NotFound
from kapi.core.files import locked, replace_text
from kapi.trainer.data.preprocess import Preprocessing, fit
from kapi.trainer.data.sources import Samples

SPLITS = ("train", "val", "test")
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Dataset:
    """One version: its arrays (read on demand) and what ingest recorded of it."""

    name: str
    digest: str
    path: Path
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.model_validate(self.meta["preprocessing"])

    def arrays(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[np.str_]]:
        with np.load(self.path / "arrays.npz", allow_pickle=False) as data:
            return data["x"], data["y"], data["split"]

    def split(self, which: str) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        x, y, split = self.arrays()
        chosen = split == which
        return x[chosen], y[chosen]


class DatasetStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ingest(
        self,
        name: str,
        samples: Samples,
        *,
        seed: int = 0,
        val: float = 0.1,
        test: float = 0.1,
        resize: tuple[int, int] | None = None,
        channels: Literal["grayscale", "rgb"] | None = None,
    ) -> tuple[Dataset, bool]:
        """Store a version; returns it and whether it is new (False: the same data, ingested
        the same way, is there already)."""
        _check_name(name)
        samples.check()
        split = stratified_split(samples, seed=seed, val=val, test=test)
        x_train = samples.x[split == "train"]
        try:
            preprocessing = fit(x_train, resize, channels)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        options = {"resize": resize, "channels": channels}
        digest = content_digest(samples, split, options)
        target = self.root / name / digest.removeprefix("sha256:")[:16]
        (self.root / name).mkdir(parents=True, exist_ok=True)
        with locked(self.root / name / ".lock"):  # one ingest of a name at a time
            if target.is_dir():
                self._list_version(name, target)  # one a failed ingest did not list yet
                return self.get(name, digest), False
            meta = _meta(name, digest, samples, split, seed, val, test, preprocessing)
            staging = Path(tempfile.mkdtemp(dir=self.root / name, prefix=".ingest-"))
            try:
                with (staging / "arrays.npz").open("wb") as file:
                    np.savez(file, x=samples.x, y=samples.y, split=split)
                    file.flush()
                    os.fsync(file.fileno())
                _write_json(staging / "meta.json", meta)
                os.replace(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._list_version(name, target)
        return Dataset(name, digest, target, meta), True

    def versions(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name / "versions.json"
        if not path.is_file():
            raise NotFound(f"dataset '{name}' is not in {self.root}")
        versions: list[dict[str, Any]] = json.loads(path.read_text())
        return versions

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "versions.json").is_file())

    def get(self, name: str, version: str | None = None) -> Dataset:
        """A version by digest (or its first hex digits); None: the latest."""
        versions = self.versions(name)
        if version is None:
            entry = versions[-1]
        else:
            wanted = version.removeprefix("sha256:")
            matches = [
                v for v in versions if v["digest"].removeprefix("sha256:").startswith(wanted)
            ]
            if len(matches) != 1:
                raise NotFound(
                    f"dataset '{name}' has {'no' if not matches else 'several'} versions "
                    f"matching {version!r}"
                )
            entry = matches[0]
        path = self.root / name / entry["digest"].removeprefix("sha256:")[:16]
        meta = json.loads((path / "meta.json").read_text())
        return Dataset(name, entry["digest"], path, meta)

    def _list_version(self, name: str, version_dir: Path) -> None:
        """Add a version to versions.json unless it is there (a version whose directory is
        in place is real: its meta.json is its record)."""
        path = self.root / name / "versions.json"
        versions = json.loads(path.read_text()) if path.is_file() else []
        meta = json.loads((version_dir / "meta.json").read_text())
        if any(v["digest"] == meta["digest"] for v in versions):
            return
        versions.append(
            {
                "digest": meta["digest"],
                "created_at": meta["created_at"],
                "description": meta["description"],
                "samples": sum(sum(c.values()) for c in meta["counts"].values()),
            }
        )
        _write_json(path, versions)


def _meta(
    name: str,
    digest: str,
    samples: Samples,
    split: npt.NDArray[np.str_],
    seed: int,
    val: float,
    test: float,
    preprocessing: Preprocessing,
) -> dict[str, Any]:
    counts = {
        which: {
            c: int(np.count_nonzero((split == which) & (samples.y == i)))
            for i, c in enumerate(samples.classes)
        }
        for which in SPLITS
    }
    return {
        "name": name,
        "digest": digest,
        "created_at": datetime.now(UTC).isoformat(),
        "description": samples.description,
        "classes": samples.classes,
        "sample_shape": list(samples.x.shape[1:]),
        "dtype": str(samples.x.dtype),
        "counts": counts,
        "split": {"seed": seed, "val": val, "test": test, "given": samples.given_split is not None},
        "preprocessing": preprocessing.model_dump(mode="json"),
    }


def _write_json(path: Path, value: Any) -> None:
    """Replace a JSON file in one step, through a temporary file of its own, synced."""
    replace_text(path, json.dumps(value, indent=2, allow_nan=False))


def stratified_split(
    samples: Samples, *, seed: int, val: float, test: float
) -> npt.NDArray[np.str_]:
    """train / val / test per sample: stratified by class, seeded. A test split that came
    with the data is kept (`test` is then unused), and val is `val` of the rest."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise InvalidArgument(
            f"val {val} and test {test} must be fractions that leave a training split"
        )
    split = np.full(len(samples.y), "train", dtype="<U5")
    pool = np.arange(len(samples.y))
    if samples.given_split is not None:
        split[samples.given_split == "test"] = "test"
        pool = pool[samples.given_split != "test"]
        val_share = val
    else:
        if test:
            pool, taken = _split(pool, samples.y, test, seed)
            split[taken] = "test"
        val_share = val / (1 - test)
    if val:
        _, taken = _split(pool, samples.y, val_share, seed + 1)
        split[taken] = "val"
    return split


def _split(
    pool: npt.NDArray[np.int64], y: npt.NDArray[np.int64], share: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(kept, taken): `share` of the pool taken, stratified by label."""
    from sklearn.model_selection import train_test_split

    try:
        kept, taken = train_test_split(pool, test_size=share, random_state=seed, stratify=y[pool])
    except ValueError as exc:  # a class too small to be in every split
        raise InvalidArgument(f"cannot split the dataset stratified by class: {exc}") from exc
    return np.asarray(kept), np.asarray(taken)


def content_digest(samples: Samples, split: npt.NDArray[np.str_], options: dict[str, Any]) -> str:
    digest = hashlib.sha256(b"kapi-dataset-1\0")
    codes = np.zeros(len(split), dtype=np.uint8)  # train 0, val 1, test 2
    for number, which in enumerate(SPLITS):
        codes[split == which] = number
    for array in (samples.x, samples.y, codes):
        # Little-endian whatever the host, so that a digest is the same everywhere.
        contiguous = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}\0".encode())
        digest.update(contiguous.tobytes())
    digest.update(json.dumps({"classes": samples.classes, **options}, sort_keys=True).encode())
    return f"sha256:{digest.hexdigest()}"


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"dataset name {name!r} is not valid: 1 to 63 lowercase letters, digits and '-'"
        )
