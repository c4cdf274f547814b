"""What the checks judge, measured on the artifact itself and only when a check asks: its
logits on the held-out test split, the fp32 reference's, timings on this machine, accuracy
under perturbations and the formal certificates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.core.errors import FailedPrecondition, InvalidArgument
from kapi.trainer.data.preprocess import Preprocessing
from kapi.trainer.data.store import Dataset
from kapi.verifier.artifact import Artifact, Logits, runner


@dataclass(frozen=True)
class Holdout:
    """Held-out images as stored (uint8 [N, H, W, C]), their labels where known, and the
    preprocessing the model was trained and is served with."""

    name: str
    images: npt.NDArray[Any]
    labels: npt.NDArray[np.int64] | None
    preprocessing: Preprocessing
    digest: str | None = None

    @classmethod
    def from_dataset(cls, dataset: Dataset, samples: int | None = None) -> Holdout:
        x, y = dataset.split("test")
        if not len(x):
            raise FailedPrecondition(f"dataset '{dataset.name}' has no test split to judge on")
        if samples is not None and samples < len(x):  # a seeded, sorted subset
            chosen = np.sort(np.random.default_rng(0).permutation(len(x))[:samples])
            x, y = x[chosen], y[chosen]
        return cls(dataset.name, x, y, dataset.preprocessing, dataset.digest)

    @property
    def is_images(self) -> bool:
        return self.preprocessing.kind == "image"

    def inputs(self, images: npt.NDArray[Any] | None = None) -> npt.NDArray[np.float32]:
        return self.preprocessing.apply(self.images if images is None else images)

    def pixel_range(self) -> float:
        """The raw value that the [0, 1] pixel scale's 1 stands for (255 for 8-bit images)."""
        return 1.0 / self.preprocessing.scale


class Evidence:
    """The artifact's measured facts, each computed once, on first use."""

    def __init__(
        self,
        artifact: Artifact,
        tests: Holdout,
        *,
        profile: str,
        reference: Artifact | None = None,
        runs: int = 200,
        formal_samples: int = 100,
    ) -> None:
        self.artifact, self.tests, self.profile = artifact, tests, profile
        self.reference, self.runs, self.formal_samples = reference, runs, formal_samples

    @cached_property
    def logits(self) -> Logits:
        return self._run(self.tests.inputs())

    @cached_property
    def reference_logits(self) -> Logits | None:
        if self.reference is None:
            return None
        return runner(self.reference)(self.tests.inputs())

    @cached_property
    def _run(self) -> Callable[[npt.NDArray[np.float32]], Logits]:
        return runner(self.artifact)

    def accuracy(self, logits: Logits | None = None) -> float | None:
        labels = self.tests.labels
        if labels is None:
            return None
        chosen = self.logits if logits is None else logits
        return float((chosen.argmax(1) == labels).mean())

    @cached_property
    def timing(self) -> Any:
        """p50/p95 latency at batch 1 on one thread and peak memory, in a fresh process."""
        from kapi.trainer.hpo.measure import measure

        return measure(self.artifact.path, self.artifact.runtime, runs=self.runs)

    @cached_property
    def throughput(self) -> tuple[float, int]:
        """(inferences per second, the batch that gave them), with every core."""
        from kapi.trainer.hpo.measure import best_throughput

        return best_throughput(self.artifact.path, self.artifact.runtime, runs=self.runs)

    def perturbed_accuracy(self, kind: str, amount: float) -> tuple[float, str]:
        """The worst accuracy over the perturbation's variants, and which one it was."""
        if not self.tests.is_images:
            raise InvalidArgument("robustness checks perturb images; this test set holds rows")
        if self.tests.labels is None:
            raise InvalidArgument("robustness checks need labelled test samples")
        scores = []
        for name, images in _perturbations(self.tests, kind, amount):
            predicted = self._run(self.tests.inputs(images)).argmax(1)
            scores.append((float((predicted == self.tests.labels).mean()), name))
        return min(scores)

    def certificates(self, epsilons: list[float]) -> dict[str, Any]:
        """The formal verifier's certified fraction per ε on the first test samples."""
        from kapi.verifier.formal import certify_test_set

        if not self.tests.is_images:
            raise InvalidArgument("formal checks bound image models; this test set holds rows")
        if self.tests.labels is None:
            raise InvalidArgument("formal checks need labelled test samples")
        count = min(self.formal_samples, len(self.tests.images))
        tests = Holdout(
            self.tests.name,
            self.tests.images[:count],
            self.tests.labels[:count],
            self.tests.preprocessing,
        )
        return certify_test_set(self.artifact.path, tests, epsilons)


def _perturbations(
    tests: Holdout, kind: str, amount: float
) -> list[tuple[str, npt.NDArray[np.float32]]]:
    """Perturbed copies of the raw test images, on their own scale, clipped to it."""
    top = tests.pixel_range()
    images = tests.images.astype(np.float32)
    if kind == "gaussian_noise_std":
        noise = np.random.default_rng(0).standard_normal(images.shape, dtype=np.float32)
        return [(f"noise std {amount:g}", np.clip(images + noise * amount * top, 0, top))]
    if kind == "brightness_delta":
        return [
            (f"brightness {sign * amount:+g}", np.clip(images + sign * amount * top, 0, top))
            for sign in (1.0, -1.0)
        ]
    if kind == "shift_pixels":
        shift = int(amount)
        return [
            (f"shift {name} {shift}px", _shifted(images, dy * shift, dx * shift))
            for name, dy, dx in (("up", -1, 0), ("down", 1, 0), ("left", 0, -1), ("right", 0, 1))
        ]
    raise InvalidArgument(f"unknown perturbation {kind!r}")


def _shifted(images: npt.NDArray[np.float32], dy: int, dx: int) -> npt.NDArray[np.float32]:
    """Each image moved by (dy, dx) pixels, the uncovered border filled with zeros."""
    out = np.zeros_like(images)
    height, width = images.shape[1:3]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = images[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out
