"""Leakage: val and test samples with an exact or a near duplicate in the training split,
and test samples with one in the val split (model selection on val would see them), each
near one paired with the sample of the closest phash in the other split. Those pairs' pixel
correlation (blind to brightness and contrast) is reported with them: on small images,
phashes within a few bits are often merely similar items, and the correlation tells."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.trainer.data.analyze.arrays import Array, Ints, batches
from kapi.trainer.data.analyze.duplicates import EXAMPLES, NearPairs, first_member

ALIKE = 0.98  # pixel correlation above which a near pair is counted as alike


# (section, the split it leaks from, the split its duplicates are in)
PAIRS = (("val", "val", "train"), ("test", "test", "train"), ("test_vs_val", "test", "val"))


def find_leakage(x: Array, content: Ints, split: Array, near: NearPairs | None) -> dict[str, Any]:
    """Per section of PAIRS: the samples of one split with a duplicate in the other."""
    found = {}
    for section, leaking, against in PAIRS:
        if (split == leaking).any() and (split == against).any():
            found[section] = _leakage(x, content, split, near, leaking, against)
    return found


def _leakage(
    x: Array, content: Ints, split: Array, near: NearPairs | None, leaking: str, against: str
) -> dict[str, Any]:
    other = split == against
    exact = first_member(content, other, int(content.max()) + 1)[content]
    close, distance = np.full(len(x), -1, dtype=np.int64), np.zeros(len(x), dtype=np.int64)
    if near is not None:
        close, distance = near.closest_in(other)
        close[exact >= 0] = -1
    members = split == leaking
    leaked = np.flatnonzero(members & (close >= 0))
    correlation = np.zeros(len(x))
    correlation[leaked] = _pixel_correlation(x, leaked, close[leaked])
    result = _split_leakage(members, exact, close, distance, correlation, near is not None)
    return {"split": leaking, "against": against, **result}


def _split_leakage(
    members: npt.NDArray[np.bool_],
    exact_partner: Ints,
    near_partner: Ints,
    distance: Ints,
    correlation: Array,
    searched: bool,
) -> dict[str, Any]:
    exact = np.flatnonzero(members & (exact_partner >= 0))
    near = np.flatnonzero(members & (near_partner >= 0))
    near = near[np.argsort(-correlation[near], kind="stable")]  # the most alike first
    examples = [
        {"index": int(i), "partner_index": int(exact_partner[i]), "kind": "exact"}
        for i in exact[:EXAMPLES]
    ] + [
        {
            "index": int(i),
            "partner_index": int(near_partner[i]),
            "kind": "near",
            "distance": int(distance[i]),
            "pixel_correlation": round(float(correlation[i]), 4),
        }
        for i in near[:EXAMPLES]
    ]
    return {
        "samples": int(members.sum()),
        "exact": len(exact),
        "near": len(near),
        "near_by_distance": np.bincount(distance[near]).tolist() if searched else None,
        "near_alike": int((correlation[near] >= ALIKE).sum()) if searched else None,
        "exact_indices": exact.tolist(),
        "near_indices": sorted(near.tolist()),
        "examples": examples,
    }


def _pixel_correlation(x: Array, a: Ints, b: Ints) -> Array:
    """Pearson correlation of the pixels of x[a[i]] and x[b[i]]."""
    result = np.zeros(len(a))
    for part in batches(x, np.arange(len(a))):
        left, right = _centred(x[a[part]]), _centred(x[b[part]])
        norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
        dots = (left * right).sum(axis=1)
        result[part] = np.where(norms > 0, dots / np.maximum(norms, 1e-12), 0)
    return result


def _centred(samples: Array) -> Array:
    flat = samples.reshape(len(samples), -1).astype(np.float64)
    return np.asarray(flat - flat.mean(axis=1, keepdims=True))
