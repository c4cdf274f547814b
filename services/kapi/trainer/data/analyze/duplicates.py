"""Duplicates: exact and, for images, near.

- Exact duplicates: equal sha256 of the sample's bytes.
- Near duplicates, images only: imagehash's 64-bit phash; two images are near when their
  hashes differ in at most `threshold` bits. By pigeonhole, two hashes within t bits agree
  exactly on at least one of t + 1 disjoint bands of bits, so hashes are compared only
  inside a band's buckets, and no pair within the threshold is missed. Groups are connected
  components of near pairs, so a group may chain (A near B near C, A and C further apart);
  leakage is judged on the pairs themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kapi.trainer.data.analyze.arrays import Array, Ints

EXAMPLES = 20  # duplicate groups and leaked samples listed by index


def content_ids(x: Array) -> Ints:
    """Per sample, an id shared by exactly the samples whose bytes are equal."""
    samples = np.ascontiguousarray(x).reshape(len(x), -1)
    digests = np.array([hashlib.sha256(row.tobytes()).digest() for row in samples], "S32")
    return np.unique(digests, return_inverse=True)[1].astype(np.int64)


def phashes(x: Array) -> npt.NDArray[np.uint64]:
    import imagehash
    from PIL import Image

    colour = x.shape[-1] in (3, 4)
    bits = np.empty((len(x), 64), dtype=bool)
    for i, sample in enumerate(x):
        image = Image.fromarray(sample if colour else sample[..., 0])
        bits[i] = imagehash.phash(image).hash.ravel()
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def first_member(ids: Ints, chosen: npt.NDArray[np.bool_], count: int) -> Ints:
    """Per id, the first chosen sample that has it (-1: none)."""
    member = np.full(count, -1, dtype=np.int64)
    indices = np.flatnonzero(chosen)
    present, first = np.unique(ids[indices], return_index=True)
    member[present] = indices[first]
    return member


def _groups(ids: Ints) -> list[Ints]:
    """Samples that share an id, two or more, largest groups first."""
    order = np.argsort(ids, kind="stable")
    cuts = np.flatnonzero(ids[order][1:] != ids[order][:-1]) + 1
    groups = [group for group in np.split(order, cuts) if len(group) > 1]
    return sorted(groups, key=lambda group: (-len(group), int(group[0])))


def _group_entry(group: Ints, split: Array, labels: Ints | None = None) -> dict[str, Any]:
    listed = group[:50]
    entry = {"size": len(group), "indices": listed.tolist(), "splits": split[listed].tolist()}
    return entry if labels is None else {**entry, "labels": labels[listed].tolist()}


def exact_duplicates(content: Ints, y: Ints, split: Array) -> dict[str, Any]:
    groups = _groups(content)
    return {
        "method": "sha256 of the sample's bytes",
        "groups": len(groups),
        "samples": sum(len(g) for g in groups),
        "conflicting_labels": sum(len(np.unique(y[g])) > 1 for g in groups),
        "examples": [_group_entry(g, split, y) for g in groups[:EXAMPLES]],
    }


@dataclass(frozen=True)
class NearPairs:
    """Samples' phashes as ids into the distinct hashes, and the pairs of distinct hashes
    (first < second) that differ in 1 to `threshold` bits."""

    threshold: int
    hashes: npt.NDArray[np.uint64]  # the distinct hashes
    ids: Ints  # per sample
    first: Ints
    second: Ints

    @classmethod
    def find(cls, phashes: npt.NDArray[np.uint64], threshold: int) -> NearPairs:
        hashes, ids = np.unique(phashes, return_inverse=True)
        found: list[Ints] = [np.empty((0, 2), np.int64)]
        widths = [64 // (threshold + 1) + (i < 64 % (threshold + 1)) for i in range(threshold + 1)]
        for shift, width in zip(np.cumsum([0, *widths[:-1]]), widths, strict=True):
            keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(keys, kind="stable")
            cuts = np.flatnonzero(keys[order][1:] != keys[order][:-1]) + 1
            found += [_close(b, hashes, threshold) for b in np.split(order, cuts) if len(b) > 1]
        pairs = np.unique(np.concatenate(found), axis=0)
        return cls(threshold, hashes, ids.astype(np.int64), pairs[:, 0], pairs[:, 1])

    def closest_in(self, chosen: npt.NDArray[np.bool_]) -> tuple[Ints, Ints]:
        """Per sample, the chosen sample of the closest phash within the threshold (-1:
        none) and that distance in bits."""
        by_hash = first_member(self.ids, chosen, len(self.hashes))
        partner = by_hash.copy()
        distance = np.zeros(len(self.hashes), dtype=np.int64)
        source = np.concatenate([self.first, self.second])
        target = np.concatenate([self.second, self.first])
        bits = np.bitwise_count(self.hashes[source] ^ self.hashes[target]).astype(np.int64)
        keep = (by_hash[source] < 0) & (by_hash[target] >= 0)
        source, target, bits = source[keep], target[keep], bits[keep]
        order = np.lexsort((bits, source))  # by source, the closest first
        present, first = np.unique(source[order], return_index=True)
        partner[present] = by_hash[target[order][first]]
        distance[present] = bits[order][first]
        return partner[self.ids], distance[self.ids]

    def groups(self, content: Ints, split: Array) -> dict[str, Any]:
        """Components of near pairs that hold at least two distinct contents (groups of
        byte-identical samples alone are exact duplicates)."""
        component = _components(len(self.hashes), self.first, self.second)[self.ids]
        groups = [g for g in _groups(component) if len(np.unique(content[g])) > 1]
        return {
            "method": f"imagehash.phash, 64 bits, Hamming distance <= {self.threshold}, "
            f"compared within {self.threshold + 1} bands of bits (pigeonhole: none missed)",
            "threshold": self.threshold,
            "pairs_of_distinct_hashes": len(self.first),
            "groups": len(groups),
            "samples": sum(len(g) for g in groups),
            "largest_group": len(groups[0]) if groups else 0,
            "examples": [_group_entry(g, split) for g in groups[:EXAMPLES]],
        }


def _close(members: Ints, hashes: npt.NDArray[np.uint64], threshold: int) -> Ints:
    """Pairs (first < second) among one bucket's hashes within the threshold."""
    found = []
    rows = max(1, 4_000_000 // len(members))  # bounds the xor matrix of a large bucket
    for start in range(0, len(members), rows):
        block = members[start : start + rows]
        close = np.bitwise_count(hashes[block][:, None] ^ hashes[members][None, :]) <= threshold
        i, j = np.nonzero(close)
        keep = start + i < j
        found.append(np.stack([block[i[keep]], members[j[keep]]], axis=1))
    pairs = np.concatenate(found)
    return np.sort(pairs, axis=1).astype(np.int64)


def _components(count: int, first: Ints, second: Ints) -> Ints:
    parent = list(range(count))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in zip(first.tolist(), second.tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(node) for node in range(count)], dtype=np.int64)
