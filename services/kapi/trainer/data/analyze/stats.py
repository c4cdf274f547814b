"""What the data holds: its description, the class balance per split (with the imbalance
ratio, largest class over smallest), and statistics per channel for images (scaled to
[0, 1]) or per feature for rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from kapi.trainer.data.analyze.arrays import Array, Ints, batches
from kapi.trainer.data.store import SPLITS, Dataset


def describe(dataset: Dataset, x: Array, split: Array) -> dict[str, Any]:
    return {
        "name": dataset.name,
        "digest": dataset.digest,
        "description": dataset.meta.get("description", ""),
        "kind": "image" if x.ndim == 4 else "rows",
        "samples": len(x),
        "sample_shape": list(x.shape[1:]),
        "dtype": str(x.dtype),
        "splits": {s: int((split == s).sum()) for s in SPLITS if (split == s).any()},
    }


def class_balance(y: Ints, split: Array, classes: list[str]) -> dict[str, Any]:
    counts: dict[str, list[int]] = {
        s: np.bincount(y[split == s], minlength=len(classes)).tolist()
        for s in SPLITS
        if (split == s).any()
    }
    counts["all"] = np.bincount(y, minlength=len(classes)).tolist()
    return {
        "classes": classes,
        "counts": counts,
        "imbalance": {s: _imbalance(c) for s, c in counts.items()},
    }


def _imbalance(counts: list[int]) -> float | None:
    """Largest class over smallest; None where a class is missing from the split."""
    return round(max(counts) / min(counts), 3) if min(counts) > 0 else None


def channel_stats(x: Array, split: Array) -> dict[str, Any]:
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    stats: dict[str, Any] = {"scaled_to": [0, 1] if x.dtype == np.uint8 else None}
    for s in SPLITS:
        chosen = np.flatnonzero(split == s)
        if not len(chosen):
            continue
        sums, squares = np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
        low, high = np.full(x.shape[-1], np.inf), np.full(x.shape[-1], -np.inf)
        for part in batches(x, chosen):
            batch = x[part].astype(np.float64) * scale
            sums += batch.sum(axis=(0, 1, 2))
            squares += (batch**2).sum(axis=(0, 1, 2))
            low = np.minimum(low, batch.min(axis=(0, 1, 2)))
            high = np.maximum(high, batch.max(axis=(0, 1, 2)))
        count = len(chosen) * x.shape[1] * x.shape[2]
        mean = sums / count
        stats[s] = {
            "mean": _floats(mean),
            "std": _floats(np.sqrt(np.maximum(squares / count - mean**2, 0.0))),
            "min": _floats(low),
            "max": _floats(high),
        }
    return stats


def feature_stats(x: Array, split: Array) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for s in SPLITS:
        rows = x[split == s].astype(np.float64)
        if not len(rows):
            continue
        finite = np.where(np.isfinite(rows), rows, np.nan)
        stats[s] = {
            "mean": _floats(np.nanmean(finite, axis=0)),
            "std": _floats(np.nanstd(finite, axis=0)),
            "min": _floats(np.nanmin(finite, axis=0)),
            "max": _floats(np.nanmax(finite, axis=0)),
            "not_finite": int((~np.isfinite(rows)).sum()),
        }
    return stats


def _floats(values: Array) -> list[float]:
    return [round(float(v), 5) for v in values]
