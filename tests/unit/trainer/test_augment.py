"""Augmentation: deterministic in its seed, blind to and harmless for the global RNG, shape
preserving for any batch, channel count and size, and each transform doing what it says."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from kapi.core.errors import InvalidArgument
from kapi.trainer.data.augment import AugmentConfig, Augmenter
from pydantic import ValidationError

EVERYTHING = AugmentConfig(
    crop_padding=2,
    shift=0.1,
    rotation=15.0,
    horizontal_flip=True,
    vertical_flip=True,
    noise_std=0.1,
    erasing_p=0.5,
    mixup_alpha=0.4,
)
SHAPES = [(16, 1, 28, 28), (16, 3, 32, 32), (16, 1, 8, 8)]


def _batch(
    shape: tuple[int, ...] = (16, 1, 28, 28), classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(shape, generator=generator)
    labels = torch.randint(0, classes, (shape[0],), generator=generator)
    return images, labels


def _run(augmenter: Augmenter, calls: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = _batch()
    return [augmenter(images, labels, 10) for _ in range(calls)]


def test_the_same_seed_gives_the_same_outputs() -> None:
    first, second = _run(Augmenter(EVERYTHING, seed=7)), _run(Augmenter(EVERYTHING, seed=7))
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second, strict=True):
        assert torch.equal(images_a, images_b)
        assert torch.equal(labels_a, labels_b)


def test_other_seeds_and_later_calls_give_other_outputs() -> None:
    (call_0, _), (call_1, _) = _run(Augmenter(EVERYTHING, seed=7), calls=2)
    (other_seed, _), _ = _run(Augmenter(EVERYTHING, seed=8), calls=2)
    assert not torch.equal(call_0, other_seed)
    assert not torch.equal(call_0, call_1)


def test_the_global_rng_neither_moves_nor_matters() -> None:
    images, labels = _batch()
    torch.manual_seed(0)
    expected = torch.rand(2), torch.rand(2)
    torch.manual_seed(0)
    before = torch.rand(2)
    augmented, _ = Augmenter(EVERYTHING, seed=3)(images, labels, 10)
    assert torch.equal(before, expected[0])
    assert torch.equal(torch.rand(2), expected[1])
    torch.manual_seed(99)  # another global state, the same augmentation
    assert torch.equal(Augmenter(EVERYTHING, seed=3)(images, labels, 10)[0], augmented)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_are_kept(shape: tuple[int, int, int, int]) -> None:
    images, labels = _batch(shape)
    augmented, targets = Augmenter(EVERYTHING, seed=0)(images, labels, 10)
    assert augmented.shape == images.shape
    assert augmented.dtype == torch.float32
    assert targets.shape == (shape[0], 10)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_any_batch_size(count: int) -> None:
    images, labels = _batch((count, 3, 9, 7))
    augmented, targets = Augmenter(EVERYTHING, seed=0)(images, labels, 10)
    assert augmented.shape == images.shape
    assert torch.allclose(targets.sum(1), torch.ones(count))


def test_everything_off_is_the_identity_with_one_hot_labels() -> None:
    images, labels = _batch()
    augmented, targets = Augmenter(AugmentConfig(), seed=0)(images, labels, 10)
    assert torch.equal(augmented, images)
    assert targets.dtype == torch.float32
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 10).float())


@pytest.mark.parametrize(
    "settings",
    [
        {"crop_padding": 3},
        {"shift": 0.2},
        {"rotation": 30.0},
        {"horizontal_flip": True},
        {"vertical_flip": True},
        {"noise_std": 0.5},
        {"erasing_p": 1.0},
        {"mixup_alpha": 1.0},
    ],
)
def test_each_transform_changes_the_images(settings: dict[str, Any]) -> None:
    images, labels = _batch()
    augmented, _ = Augmenter(AugmentConfig(**settings), seed=0)(images, labels, 10)
    assert augmented.shape == images.shape
    assert not torch.equal(augmented, images)


@pytest.mark.parametrize(
    "settings",
    [
        {"noise_std": 0.5, "noise_p": 0.0},
        {"horizontal_flip_p": 1.0},
        {"rotation": (0.0, 0.0)},
        {"mixup_alpha": 1.0, "mixup_p": 0.0},
    ],
)
def test_a_transform_that_cannot_fire_is_left_out(settings: dict[str, Any]) -> None:
    augmenter = Augmenter(AugmentConfig(**settings), seed=0)
    images, labels = _batch()
    assert torch.equal(augmenter(images, labels, 10)[0], images)
    assert augmenter.describe()["transforms"] == []


def test_flips_mirror_exactly() -> None:
    images, labels = _batch((4, 3, 5, 6))
    horizontal = AugmentConfig(horizontal_flip=True, horizontal_flip_p=1.0)
    vertical = AugmentConfig(vertical_flip=True, vertical_flip_p=1.0)
    assert torch.equal(Augmenter(horizontal, seed=0)(images, labels, 10)[0], images.flip(-1))
    assert torch.equal(Augmenter(vertical, seed=0)(images, labels, 10)[0], images.flip(-2))


def test_rotation_by_90_is_rot90() -> None:
    # Positive degrees turn counterclockwise, as rot90 does from the height axis to the width
    # axis; a quarter turn about the centre maps pixels onto pixels, so bilinear is exact but
    # for rounding.
    images, labels = _batch((4, 1, 12, 12))
    config = AugmentConfig(rotation=(90.0, 90.0), rotation_p=1.0)
    rotated, _ = Augmenter(config, seed=0)(images, labels, 10)
    torch.testing.assert_close(rotated, torch.rot90(images, 1, dims=(2, 3)), atol=1e-4, rtol=0)


def test_mixup_mixes_images_and_labels_alike() -> None:
    # Image i is the indicator of channel i, so a mixed image shows which two were mixed and
    # with what weight; its label must be the same combination of the two classes.
    count = 8
    images = torch.eye(count)[:, :, None, None].expand(count, count, 4, 4).contiguous()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, targets = Augmenter(AugmentConfig(mixup_alpha=0.4), seed=5)(images, labels, 3)
    assert torch.allclose(targets.sum(1), torch.ones(count))
    assert bool((targets >= 0).all())
    assert not torch.equal(targets, torch.nn.functional.one_hot(labels, 3).float())
    weights = mixed[:, :, 0, 0]  # [image, source image]
    torch.testing.assert_close(weights.sum(1), torch.ones(count))
    expected = weights @ torch.nn.functional.one_hot(labels, 3).float()
    torch.testing.assert_close(targets, expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"flip": True},
        {"rotation": -5.0},
        {"erasing_scale": (0.4, 0.1)},
        {"rotation": (10.0, -10.0)},
        {"crop_p": 1.5},
        {"mixup_alpha": -1.0},
    ],
)
def test_invalid_configuration_is_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AugmentConfig.model_validate(settings)


@pytest.mark.parametrize(
    ("images", "labels", "classes"),
    [
        (torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long), 10),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 10),
        (torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long), 10),
        (torch.zeros(2, 1, 4, 4), torch.zeros(2), 10),
        (torch.zeros(2, 1, 4, 4), torch.tensor([0, 10]), 10),
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), 0),
    ],
)
def test_malformed_batches_are_refused(
    images: torch.Tensor, labels: torch.Tensor, classes: int
) -> None:
    with pytest.raises(InvalidArgument):
        Augmenter(EVERYTHING, seed=0)(images, labels, classes)


def test_describe_records_the_transforms_and_round_trips() -> None:
    description = Augmenter(EVERYTHING, seed=11).describe()
    assert description["seed"] == 11
    assert description["transforms"] == [
        "crop",
        "shift",
        "rotation",
        "horizontal_flip",
        "vertical_flip",
        "noise",
        "erasing",
        "mixup",
    ]
    restored = json.loads(json.dumps(description))["config"]
    assert AugmentConfig.model_validate(restored) == EVERYTHING
