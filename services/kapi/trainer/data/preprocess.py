"""Preprocessing: resize, grayscale or RGB, and normalization with statistics computed on the
training split alone. It is stored with the dataset version and carried into the model
bundle, so that training, calibration and serving all apply the same transform.

Images: uint8 [N, H, W, C] in, float32 [N, C, H, W] out: resized (bilinear, antialiased),
converted, scaled to [0, 1], then (x - mean) / std per channel. Rows: (x - mean) / std per
feature.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

Size = tuple[Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]]
BATCH = 4096  # images converted at a time while fitting


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["image", "rows"]
    resize: Size | None = None  # (height, width)
    channels: Literal["grayscale", "rgb"] | None = None  # None: as the data has them
    scale: float = 1.0  # applied before mean and std: 1/255 for 8-bit images
    mean: list[float]
    std: list[float]

    def input_shape(self, sample_shape: tuple[int, ...]) -> list[int]:
        """The model's input shape for one sample (without the batch dimension)."""
        if self.kind == "rows":
            return [sample_shape[0]]
        height, width = self.resize or sample_shape[:2]
        return [len(self.mean), height, width]

    def apply(self, x: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        if self.kind == "rows":
            rows = np.asarray(x, dtype=np.float32)
            mean = np.array(self.mean, dtype=np.float32)
            return np.asarray((rows - mean) / np.array(self.std, dtype=np.float32), np.float32)
        images = _convert(np.asarray(x), self.resize, self.channels) * np.float32(self.scale)
        mean = np.array(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.array(self.std, dtype=np.float32)[None, :, None, None]
        return np.asarray((images - mean) / std, dtype=np.float32)


def fit(
    x_train: npt.NDArray[np.generic],
    resize: tuple[int, int] | None = None,
    channels: Literal["grayscale", "rgb"] | None = None,
) -> Preprocessing:
    """The preprocessing whose statistics are the training split's."""
    if x_train.ndim == 2:
        if resize is not None or channels is not None:
            raise ValueError("resize and channels apply to images, not rows")
        rows = x_train.astype(np.float64)
        return Preprocessing(
            kind="rows", mean=rows.mean(0).tolist(), std=_safe(rows.std(0)).tolist()
        )
    scale = 1 / 255 if x_train.dtype == np.uint8 else 1.0
    total: npt.NDArray[np.float64] | None = None
    squares: npt.NDArray[np.float64] | None = None
    count = 0
    for start in range(0, len(x_train), BATCH):
        images = _convert(x_train[start : start + BATCH], resize, channels).astype(np.float64)
        images *= scale
        sums, sq = images.sum(axis=(0, 2, 3)), (images**2).sum(axis=(0, 2, 3))
        total = sums if total is None else total + sums
        squares = sq if squares is None else squares + sq
        count += images.shape[0] * images.shape[2] * images.shape[3]
    if total is None or squares is None:
        raise ValueError("there are no training images to compute statistics on")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return Preprocessing(
        kind="image",
        resize=resize,
        channels=channels,
        scale=scale,
        mean=mean.tolist(),
        std=_safe(std).tolist(),
    )


def _convert(
    images: npt.NDArray[np.generic],
    resize: tuple[int, int] | None,
    channels: Literal["grayscale", "rgb"] | None,
) -> npt.NDArray[np.float32]:
    """uint8 [N, H, W, C] -> float32 [N, C', H', W'], unscaled."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    if channels == "grayscale" and x.shape[1] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
        x = (x * weights).sum(axis=1, keepdims=True)
    elif channels == "rgb" and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    if resize is not None and tuple(x.shape[2:]) != tuple(resize):
        import torch

        tensor = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=resize, mode="bilinear", antialias=True, align_corners=False
        )
        x = tensor.numpy()
    return x


def _safe(std: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A constant channel or feature divides by 1, not by 0."""
    return np.where(std > 1e-12, std, 1.0)
