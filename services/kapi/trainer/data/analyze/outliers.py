"""Outliers: robust z-scores (median and MAD within the sample's class) of the pixels' mean,
their standard deviation and the distance to the class's median thumbnail (rows: the
distance to the class's median row); the score is the norm of those z-scores. Cheap, and it
finds blank, saturated and foreign samples."""

from __future__ import annotations

from typing import Any

import numpy as np

from kapi.trainer.data.analyze.arrays import Array, Ints, batches

THUMBNAIL = 8  # the outlier score's thumbnails are about this many pixels a side


def top_outliers(x: Array, y: Ints, split: Array, classes: list[str], k: int) -> dict[str, Any]:
    names, features = _image_features(x, y) if x.ndim == 4 else _row_features(x, y)
    z = np.zeros_like(features)
    for label in np.unique(y):
        members = y == label
        z[members] = _robust_z(features[members])
    scores = np.sqrt((z**2).sum(axis=1))
    top = np.argsort(-scores, kind="stable")[:k]
    return {
        "method": "norm of robust z-scores within the class: " + ", ".join(names),
        "top": [
            {
                "index": int(i),
                "split": str(split[i]),
                "label": int(y[i]),
                "class": classes[int(y[i])],
                "score": round(float(scores[i]), 3),
                "most_unusual": names[int(np.argmax(np.abs(z[i])))],
            }
            for i in top
        ],
    }


def _robust_z(features: Array) -> Array:
    median = np.median(features, axis=0)
    deviation = np.abs(features - median)
    spread = 1.4826 * np.median(deviation, axis=0)
    # Where most of a class shares a value, the MAD is 0: fall back to the mean deviation.
    spread = np.where(spread > 1e-9, spread, np.maximum(deviation.mean(axis=0), 1e-9))
    return np.asarray((features - median) / spread)


def _image_features(x: Array, y: Ints) -> tuple[list[str], Array]:
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    factor = max(1, min(x.shape[1], x.shape[2]) // THUMBNAIL)
    height, width = x.shape[1] // factor, x.shape[2] // factor
    means, stds, thumbs = [], [], []
    for part in batches(x, np.arange(len(x))):
        batch = x[part].astype(np.float32) * np.float32(scale)
        means.append(batch.mean(axis=(1, 2, 3)))
        stds.append(batch.std(axis=(1, 2, 3)))
        blocks = batch[:, : height * factor, : width * factor].reshape(
            len(batch), height, factor, width, factor, x.shape[3]
        )
        thumbs.append(blocks.mean(axis=(2, 4)).reshape(len(batch), -1))
    distance = _distance_to_class_median(np.concatenate(thumbs), y)
    features = np.stack([np.concatenate(means), np.concatenate(stds), distance], axis=1)
    return ["pixel mean", "pixel std", "distance to the class's median thumbnail"], features


def _row_features(x: Array, y: Ints) -> tuple[list[str], Array]:
    rows = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    spread = rows.std(axis=0)
    scaled = (rows - rows.mean(axis=0)) / np.where(spread > 1e-12, spread, 1.0)
    return ["distance to the class's median row"], _distance_to_class_median(scaled, y)[:, None]


def _distance_to_class_median(vectors: Array, y: Ints) -> Array:
    distance = np.zeros(len(vectors))
    for label in np.unique(y):
        members = y == label
        median = np.median(vectors[members], axis=0)
        distance[members] = np.linalg.norm(vectors[members] - median, axis=1)
    return distance
