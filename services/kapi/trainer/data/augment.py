"""On-the-fly augmentation of preprocessed training batches, on kornia.augmentation.

Images arrive preprocessed (`preprocess.py`): float [N, C, H, W], normalized per channel, so
0 is the training mean. Crop padding, what a shift or a rotation uncovers and erased patches
are filled with 0, the mean rather than black, and the noise std is in normalized units
(1 = the data's std). Every transform is off by default.

Labels come back as float [N, num_classes] whether or not mixup is on: one-hot rows, or with
mixup the convex combination of the two classes mixed. Training has one loss path, cross
entropy against class probabilities.

Kornia draws its parameters from torch's global CPU generator (its default; it takes no
torch.Generator), so each call runs inside `torch.random.fork_rng`, seeded with
`seed * 1_000_003 + call_index`. The same seed and the same sequence of calls give the same
outputs, and the training code's own random stream goes on as if nothing had been drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import kornia
import torch
from kornia import augmentation
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kapi.core.errors import InvalidArgument

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
AreaFraction = Annotated[float, Field(gt=0.0, le=1.0)]
AspectRatio = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Degrees = Annotated[float, Field(ge=-180.0, le=180.0)]
SEED_STRIDE = 1_000_003  # a prime: the per-call seeds of two nearby seeds do not collide soon


class AugmentConfig(BaseModel):
    """Which transforms run, how strongly and how often; `*_p` is per image unless noted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Pixels of padding per side, then a random crop back to the image's size.
    crop_padding: Annotated[int, Field(ge=0, le=4096)] = 0
    crop_p: Probability = 1.0
    # A translation of at most this fraction of the width and of the height.
    shift: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    shift_p: Probability = 1.0
    # Degrees, uniform in [-rotation, rotation], or in (low, high); positive is counterclockwise.
    rotation: Degrees | tuple[Degrees, Degrees] = 0.0
    rotation_p: Probability = 1.0
    horizontal_flip: bool = False  # off unless mirroring keeps the class: not for digits
    horizontal_flip_p: Probability = 0.5
    vertical_flip: bool = False
    vertical_flip_p: Probability = 0.5
    noise_std: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    noise_p: Probability = 1.0
    erasing_p: Probability = 0.0  # cutout: a rectangle set to the mean
    erasing_scale: tuple[AreaFraction, AreaFraction] = (0.02, 0.33)  # of the image's area
    erasing_ratio: tuple[AspectRatio, AspectRatio] = (0.3, 3.3)
    mixup_alpha: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0  # Beta(alpha, alpha)
    mixup_p: Probability = 1.0  # per batch, as kornia gates mixup

    @model_validator(mode="after")
    def _ranges_ordered(self) -> AugmentConfig:
        ranges = {"erasing_scale": self.erasing_scale, "erasing_ratio": self.erasing_ratio}
        if isinstance(self.rotation, tuple):
            ranges["rotation"] = self.rotation
        elif self.rotation < 0:
            raise ValueError(f"rotation must be >= 0 or a (low, high) range, got {self.rotation}")
        for name, (low, high) in ranges.items():
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {low, high}")
        return self


@dataclass(frozen=True)
class _Transform:
    """One kornia augmentation: whether the configuration turns it on, and how it is built for
    images of a size (height, width)."""

    name: str
    enabled: Callable[[AugmentConfig], bool]
    build: Callable[[AugmentConfig, tuple[int, int]], nn.Module]


def _rotation_range(config: AugmentConfig) -> tuple[float, float]:
    rotation = config.rotation
    return (-rotation, rotation) if isinstance(rotation, float) else rotation


# Geometry first, then noise, then erasing, so that an erased patch is the plain mean.
TRANSFORMS = (
    _Transform(
        "crop",
        lambda config: config.crop_padding > 0 and config.crop_p > 0,
        lambda config, size: augmentation.RandomCrop(
            size, padding=config.crop_padding, fill=0.0, p=config.crop_p
        ),
    ),
    _Transform(
        "shift",
        lambda config: config.shift > 0 and config.shift_p > 0,
        lambda config, _: augmentation.RandomAffine(
            degrees=0.0, translate=(config.shift, config.shift), p=config.shift_p
        ),
    ),
    _Transform(
        "rotation",
        lambda config: _rotation_range(config) != (0, 0) and config.rotation_p > 0,
        lambda config, _: augmentation.RandomRotation(
            degrees=_rotation_range(config), p=config.rotation_p
        ),
    ),
    _Transform(
        "horizontal_flip",
        lambda config: config.horizontal_flip and config.horizontal_flip_p > 0,
        lambda config, _: augmentation.RandomHorizontalFlip(p=config.horizontal_flip_p),
    ),
    _Transform(
        "vertical_flip",
        lambda config: config.vertical_flip and config.vertical_flip_p > 0,
        lambda config, _: augmentation.RandomVerticalFlip(p=config.vertical_flip_p),
    ),
    _Transform(
        "noise",
        lambda config: config.noise_std > 0 and config.noise_p > 0,
        lambda config, _: augmentation.RandomGaussianNoise(
            mean=0.0, std=config.noise_std, p=config.noise_p
        ),
    ),
    _Transform(
        "erasing",
        lambda config: config.erasing_p > 0,
        lambda config, _: augmentation.RandomErasing(
            scale=config.erasing_scale, ratio=config.erasing_ratio, value=0.0, p=config.erasing_p
        ),
    ),
)


class Augmenter:
    """Augments one batch per call, deterministically in `seed` and the call's index."""

    def __init__(self, config: AugmentConfig, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidArgument(f"the augmentation seed must be an integer >= 0, got {seed!r}")
        self.config = config
        self.seed = seed
        self._calls = 0
        self._transforms = [transform for transform in TRANSFORMS if transform.enabled(config)]
        self._mixing = config.mixup_alpha > 0 and config.mixup_p > 0
        self._pipelines: dict[tuple[int, int], nn.Sequential] = {}  # RandomCrop needs the size
        self._mixup = augmentation.RandomMixUpV2(data_keys=["input", "class"])

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, class ids [N]) -> (augmented images, float class probabilities
        [N, num_classes]). With every transform off the images are returned as they came."""
        _check_batch(images, labels, num_classes)
        call_seed = (self.seed * SEED_STRIDE + self._calls) % 2**63
        self._calls += 1
        targets = nn.functional.one_hot(labels.long(), num_classes).to(images.dtype)
        pipeline = self._pipeline((images.shape[-2], images.shape[-1]))
        if images.shape[0] == 0 or (len(pipeline) == 0 and not self._mixing):
            return images, targets
        with _seeded(call_seed, images.device), torch.no_grad():
            augmented = pipeline(images) if len(pipeline) else images
            if self._mixing:
                augmented, targets = self._mix(augmented, labels, targets)
        return augmented, targets

    def describe(self) -> dict[str, Any]:
        """What the bundle's lineage records: enough to run the same augmentation again."""
        return {
            "library": "kornia",
            "kornia_version": kornia.__version__,
            "seed": self.seed,
            "seed_per_call": f"seed * {SEED_STRIDE} + call_index",
            "transforms": self.active(),
            "labels": "float probabilities [N, num_classes]",
            "config": self.config.model_dump(mode="json"),
        }

    def active(self) -> list[str]:
        """The transforms that run, in order."""
        names = [transform.name for transform in self._transforms]
        return [*names, "mixup"] if self._mixing else names

    def _pipeline(self, size: tuple[int, int]) -> nn.Sequential:
        if size not in self._pipelines:
            modules = [transform.build(self.config, size) for transform in self._transforms]
            self._pipelines[size] = nn.Sequential(*modules)
        return self._pipelines[size]

    def _mix(
        self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kornia mixes, with our parameters: it samples lambda uniformly, mixup's paper and
        `mixup_alpha` sample Beta(alpha, alpha). One lambda per image, not one per batch."""
        count = images.shape[0]
        alpha = torch.tensor(self.config.mixup_alpha)
        applied = bool(torch.rand(()) < self.config.mixup_p)
        params = {
            "batch_prob": torch.full((count,), float(applied)),
            "mixup_pairs": torch.randperm(count),
            "mixup_lambdas": torch.distributions.Beta(alpha, alpha).sample((count,)) * applied,
        }
        mixed, mixed_labels = self._mixup(images, labels.long(), params=params)
        # Kornia's class output per row: (own label, partner's label, the partner's weight).
        partner = mixed_labels[:, 1].long()
        weight = mixed_labels[:, 2:3].to(targets.dtype)
        partner_targets = nn.functional.one_hot(partner, targets.shape[1]).to(targets.dtype)
        return mixed, targets * (1 - weight) + partner_targets * weight


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The body draws from torch's CPU generator seeded with `seed`; afterwards it, and the
    images' accelerator generator in case kornia ever draws there, are as they were."""
    accelerators = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=accelerators):
        torch.default_generator.manual_seed(seed)
        yield


def _check_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise InvalidArgument(
            f"images must be a float tensor [N, C, H, W], got {images.dtype} {list(images.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise InvalidArgument(
            f"labels must be integer class ids [{images.shape[0]}], "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidArgument(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
        raise InvalidArgument(f"labels must lie in [0, {num_classes}), got a label outside it")
