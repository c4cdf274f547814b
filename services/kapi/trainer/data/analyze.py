"""What is in a dataset version, before anything trains on it: `kapi data analyze NAME`.

`analyze` writes OUT/report.json (everything), PNG plots and OUT/report.md (one page that
embeds the plots by relative link), and returns a `Report` whose `summary_lines` are for the
terminal. Sample indices are positions in `Dataset.arrays()`.

- Class balance per split, with the imbalance ratio (largest class over smallest).
- Statistics: per channel for images (scaled to [0, 1]), per feature for rows.
- Exact duplicates: equal sha256 of the sample's bytes.
- Near duplicates, images only: imagehash's 64-bit phash; two images are near when their
  hashes differ in at most `near_threshold` bits. By pigeonhole, two hashes within t bits
  agree exactly on at least one of t + 1 disjoint bands of bits, so hashes are compared only
  inside a band's buckets, and no pair within the threshold is missed. Groups are connected
  components of near pairs, so a group may chain (A near B near C, A and C further apart);
  leakage is judged on the pairs themselves.
- Leakage: val and test samples with an exact or a near duplicate in the training split,
  each near one paired with the training sample of the closest phash. Those pairs' pixel
  correlation (blind to brightness and contrast) is reported with them: on small images,
  phashes within a few bits are often merely similar items, and the correlation tells.
- Outliers: robust z-scores (median and MAD within the sample's class) of the pixels' mean,
  their standard deviation and the distance to the class's median thumbnail (rows: the
  distance to the class's median row); the score is the norm of those z-scores. Cheap, and
  it finds blank, saturated and foreign samples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kapi.core.errors import InvalidArgument
from kapi.trainer.data.store import SPLITS, Dataset

NEAR_THRESHOLD = 4
TOP_OUTLIERS = 16
PER_CLASS = 8  # samples per class in the sample grid
EXAMPLES = 20  # duplicate groups and leaked samples listed by index
BATCH_VALUES = 16_000_000  # values converted to float at a time: 128 MB of float64
THUMBNAIL = 8  # the outlier score's thumbnails are about this many pixels a side
LEAK_PLOT = 8  # leaked pairs shown
ALIKE = 0.98  # pixel correlation above which a near pair is counted as alike

Array = npt.NDArray[Any]
Ints = npt.NDArray[np.int64]
Cell = tuple[Array, str]


@dataclass(frozen=True)
class Report:
    out_dir: Path
    json_path: Path
    markdown_path: Path
    plots: dict[str, Path]  # name -> PNG
    summary: dict[str, Any]

    def summary_lines(self) -> list[str]:
        s = self.summary
        unit = "images" if s["kind"] == "image" else "rows"
        splits = " / ".join(f"{name} {count:,}" for name, count in s["splits"].items())
        exact, near = s["exact_duplicates"], s["near_duplicates"]
        duplicates = (
            f"duplicates: exact {_count(exact['groups'], 'group')} ({exact['samples']:,} {unit})"
        )
        if near is None:
            duplicates += "; near duplicates not searched in rows"
        else:
            duplicates += (
                f", near {_count(near['groups'], 'group')} ({near['samples']:,} {unit}, "
                f"phash distance <= {near['threshold']})"
            )
        lines = [
            f"{s['name']} {s['digest'][:19]}: {s['samples']:,} {unit}, {s['classes']} classes",
            f"class balance: {splits}; imbalance max/min {_ratio(s['imbalance'])}",
            duplicates,
        ]
        for name, leak in s["leakage"].items():
            kinds = f"exact {leak['exact']:,}"
            if near is not None:
                kinds += f", near {leak['near']:,}"
            if leak["near"]:
                kinds += f"; {leak['near_alike']:,} of those alike in pixels, r >= {ALIKE}"
            total = leak["exact"] + leak["near"]
            lines.append(f"leakage: {total:,} {name} {unit} duplicate training {unit} ({kinds})")
        top = ", ".join(f"#{o['index']} {o['class']} {o['score']:.1f}" for o in s["outliers"])
        lines.append(f"outliers (robust z): {top}")
        return lines


def analyze(
    dataset: Dataset,
    out_dir: Path,
    *,
    near_threshold: int = NEAR_THRESHOLD,
    top_k: int = TOP_OUTLIERS,
    per_class: int = PER_CLASS,
) -> Report:
    if not 0 <= near_threshold <= 16:
        raise InvalidArgument(f"near_threshold must be 0 to 16 bits of 64, not {near_threshold}")
    x, y, split = dataset.arrays()
    images = x.ndim == 4
    content = _content_ids(x)
    phashes = _phashes(x) if images else None
    near = _NearPairs.find(phashes, near_threshold) if phashes is not None else None
    sections: dict[str, Any] = {
        "dataset": _describe(dataset, x, split),
        "class_balance": _class_balance(y, split, dataset.classes),
        "statistics": _channel_stats(x, split) if images else _feature_stats(x, split),
        "exact_duplicates": _exact_duplicates(content, y, split),
        "near_duplicates": None if near is None else near.groups(content, split),
        "leakage": _leakage(x, content, split, near),
        "outliers": _top_outliers(x, y, split, dataset.classes, top_k),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plot_all(sections, x, y, dataset.classes, out_dir, per_class)
    summary = _summary(sections)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps({"summary": summary, **sections}, indent=2))
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(_markdown(sections, plots))
    return Report(out_dir, json_path, markdown_path, plots, summary)


# --- what the data holds ---------------------------------------------------------------


def _describe(dataset: Dataset, x: Array, split: Array) -> dict[str, Any]:
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


def _class_balance(y: Ints, split: Array, classes: list[str]) -> dict[str, Any]:
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


def _channel_stats(x: Array, split: Array) -> dict[str, Any]:
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    stats: dict[str, Any] = {"scaled_to": [0, 1] if x.dtype == np.uint8 else None}
    for s in SPLITS:
        chosen = np.flatnonzero(split == s)
        if not len(chosen):
            continue
        sums, squares = np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
        low, high = np.full(x.shape[-1], np.inf), np.full(x.shape[-1], -np.inf)
        for part in _batches(x, chosen):
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


def _feature_stats(x: Array, split: Array) -> dict[str, Any]:
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


def _batches(x: Array, indices: Ints) -> list[Ints]:
    """The indices in runs small enough to convert to float."""
    size = max(1, BATCH_VALUES // max(1, int(np.prod(x.shape[1:]))))
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def _floats(values: Array) -> list[float]:
    return [round(float(v), 5) for v in values]


# --- duplicates and leakage --------------------------------------------------------------


def _content_ids(x: Array) -> Ints:
    """Per sample, an id shared by exactly the samples whose bytes are equal."""
    samples = np.ascontiguousarray(x).reshape(len(x), -1)
    digests = np.array([hashlib.sha256(row.tobytes()).digest() for row in samples], "S32")
    return np.unique(digests, return_inverse=True)[1].astype(np.int64)


def _phashes(x: Array) -> npt.NDArray[np.uint64]:
    import imagehash
    from PIL import Image

    colour = x.shape[-1] in (3, 4)
    bits = np.empty((len(x), 64), dtype=bool)
    for i, sample in enumerate(x):
        image = Image.fromarray(sample if colour else sample[..., 0])
        bits[i] = imagehash.phash(image).hash.ravel()
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


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


def _exact_duplicates(content: Ints, y: Ints, split: Array) -> dict[str, Any]:
    groups = _groups(content)
    return {
        "method": "sha256 of the sample's bytes",
        "groups": len(groups),
        "samples": sum(len(g) for g in groups),
        "conflicting_labels": sum(len(np.unique(y[g])) > 1 for g in groups),
        "examples": [_group_entry(g, split, y) for g in groups[:EXAMPLES]],
    }


@dataclass(frozen=True)
class _NearPairs:
    """Samples' phashes as ids into the distinct hashes, and the pairs of distinct hashes
    (first < second) that differ in 1 to `threshold` bits."""

    threshold: int
    hashes: npt.NDArray[np.uint64]  # the distinct hashes
    ids: Ints  # per sample
    first: Ints
    second: Ints

    @classmethod
    def find(cls, phashes: npt.NDArray[np.uint64], threshold: int) -> _NearPairs:
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
        by_hash = _first_member(self.ids, chosen, len(self.hashes))
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


def _leakage(x: Array, content: Ints, split: Array, near: _NearPairs | None) -> dict[str, Any]:
    """Per val and test split: its samples with a duplicate in the training split."""
    train = split == "train"
    exact = _first_member(content, train, int(content.max()) + 1)[content]
    close, distance = np.full(len(x), -1, dtype=np.int64), np.zeros(len(x), dtype=np.int64)
    if near is not None:
        close, distance = near.closest_in(train)
        close[exact >= 0] = -1
    leaked = np.flatnonzero(close >= 0)
    correlation = np.zeros(len(x))
    correlation[leaked] = _pixel_correlation(x, leaked, close[leaked])
    return {
        s: _split_leakage(split == s, exact, close, distance, correlation, near is not None)
        for s in SPLITS[1:]
        if (split == s).any()
    }


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
        {"index": int(i), "train_index": int(exact_partner[i]), "kind": "exact"}
        for i in exact[:EXAMPLES]
    ] + [
        {
            "index": int(i),
            "train_index": int(near_partner[i]),
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
    for part in _batches(x, np.arange(len(a))):
        left, right = _centred(x[a[part]]), _centred(x[b[part]])
        norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
        dots = (left * right).sum(axis=1)
        result[part] = np.where(norms > 0, dots / np.maximum(norms, 1e-12), 0)
    return result


def _centred(samples: Array) -> Array:
    flat = samples.reshape(len(samples), -1).astype(np.float64)
    return np.asarray(flat - flat.mean(axis=1, keepdims=True))


def _first_member(ids: Ints, chosen: npt.NDArray[np.bool_], count: int) -> Ints:
    """Per id, the first chosen sample that has it (-1: none)."""
    member = np.full(count, -1, dtype=np.int64)
    indices = np.flatnonzero(chosen)
    present, first = np.unique(ids[indices], return_index=True)
    member[present] = indices[first]
    return member


# --- outliers ----------------------------------------------------------------------------


def _top_outliers(x: Array, y: Ints, split: Array, classes: list[str], k: int) -> dict[str, Any]:
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
    for part in _batches(x, np.arange(len(x))):
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


# --- summary, plots, page ----------------------------------------------------------------


def _summary(sections: dict[str, Any]) -> dict[str, Any]:
    described, near = sections["dataset"], sections["near_duplicates"]
    return {
        "name": described["name"],
        "digest": described["digest"],
        "kind": described["kind"],
        "samples": described["samples"],
        "classes": len(sections["class_balance"]["classes"]),
        "splits": described["splits"],
        "imbalance": sections["class_balance"]["imbalance"]["all"],
        "exact_duplicates": {
            key: sections["exact_duplicates"][key] for key in ("groups", "samples")
        },
        "near_duplicates": None
        if near is None
        else {key: near[key] for key in ("groups", "samples", "threshold")},
        "leakage": {
            s: {key: leak[key] for key in ("exact", "near", "near_alike")}
            for s, leak in sections["leakage"].items()
        },
        "outliers": [
            {key: o[key] for key in ("index", "class", "score")}
            for o in sections["outliers"]["top"][:5]
        ],
    }


def _plot_all(
    sections: dict[str, Any], x: Array, y: Ints, classes: list[str], out: Path, per_class: int
) -> dict[str, Path]:
    plots = {"class_balance": out / "class_balance.png", "outliers": out / "outliers.png"}
    _plot_balance(sections["class_balance"], plots["class_balance"])
    top = sections["outliers"]["top"]
    if x.ndim != 4:
        _plot_scores(top, plots["outliers"])
        return plots
    cells = [(x[o["index"]], f"#{o['index']} {o['class']}\nz {o['score']:.1f}") for o in top]
    _image_grid([cells[i : i + 8] for i in range(0, len(cells), 8)], plots["outliers"])
    rng = np.random.default_rng(0)
    rows = []
    for label in range(len(classes)):
        members = np.flatnonzero(y == label)
        chosen = np.sort(rng.choice(members, min(per_class, len(members)), replace=False))
        rows.append([(x[i], f"#{i}") for i in chosen])
    plots["samples"] = out / "samples.png"
    _image_grid(rows, plots["samples"], row_labels=classes)
    leaked = [(s, e) for s, leak in sections["leakage"].items() for e in leak["examples"]]
    if leaked:
        # Exact first, then the near pairs most alike: those most likely to be one image.
        leaked.sort(
            key=lambda pair: (pair[1]["kind"] != "exact", -pair[1].get("pixel_correlation", 1))
        )
        pairs = leaked[:LEAK_PLOT]
        plots["leakage"] = out / "leakage.png"
        _image_grid(
            [
                [(x[e["index"]], f"{s} #{e['index']}\n{_likeness(e)}") for s, e in pairs],
                [(x[e["train_index"]], f"train #{e['train_index']}") for _, e in pairs],
            ],
            plots["leakage"],
        )
    return plots


def _likeness(example: dict[str, Any]) -> str:
    if example["kind"] == "exact":
        return "exact"
    return f"{example['distance']} bits, r {example['pixel_correlation']:.3f}"


def _figure(
    width: float, height: float, layout: Literal["constrained"] | None = "constrained"
) -> Any:
    # The Agg canvas on a bare Figure: no pyplot, so no global backend or figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _plot_balance(balance: dict[str, Any], path: Path) -> None:
    classes, counts = balance["classes"], balance["counts"]
    splits = [s for s in counts if s != "all"]
    figure = _figure(max(6.0, 0.45 * len(classes) * len(splits) ** 0.5 + 2), 4)
    axes = figure.add_subplot()
    width = 0.8 / len(splits)
    for k, s in enumerate(splits):
        axes.bar(np.arange(len(classes)) + (k - (len(splits) - 1) / 2) * width, counts[s], width)
    axes.legend(splits)
    axes.set_xticks(np.arange(len(classes)), classes, rotation=45, ha="right")
    axes.set_ylabel("samples")
    axes.set_title("class balance per split")
    figure.savefig(path)


def _plot_scores(top: list[dict[str, Any]], path: Path) -> None:
    figure = _figure(max(6.0, 0.4 * len(top)), 3.5)
    axes = figure.add_subplot()
    axes.bar([f"#{o['index']}" for o in top], [o["score"] for o in top])
    axes.tick_params(axis="x", rotation=90)
    axes.set_ylabel("outlier score (robust z)")
    axes.set_title("top outliers")
    figure.savefig(path)


def _image_grid(
    rows: Sequence[Sequence[Cell]], path: Path, row_labels: Sequence[str] | None = None
) -> None:
    """The images tiled into one canvas and drawn once: an axes per image costs tens of
    milliseconds each."""
    first = next(image for row in rows for image, _ in row)
    stride = -(-max(first.shape[:2]) // 128)  # a tile is drawn about 130 pixels wide
    height, width = first[::stride, ::stride].shape[:2]
    pad = max(1, width // 8)
    band = int(0.3 * (width + pad)) + 1  # room for a two-line title above each image
    step_x, step_y = width + pad, band + height + pad
    canvas = np.ones((len(rows) * step_y, max(len(row) for row in rows) * step_x, 3), np.float32)
    for r, row in enumerate(rows):
        for c, (image, _) in enumerate(row):
            top, left = r * step_y + band, c * step_x
            canvas[top : top + height, left : left + width] = _rgb(image[::stride, ::stride])
    inch = 1.3 / step_x
    margin = 1.2 if row_labels else 0.0
    figure = _figure(canvas.shape[1] * inch + margin, canvas.shape[0] * inch, layout=None)
    left = margin / figure.get_figwidth()
    axes = figure.add_axes((left, 0, 1 - left, 1))
    axes.imshow(canvas, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    for r, row in enumerate(rows):
        for c, (_, title) in enumerate(row):
            middle, bottom = c * step_x + width / 2, r * step_y + band - 0.5
            axes.text(middle, bottom, title, ha="center", va="bottom", fontsize=7)
        if row_labels:
            middle = r * step_y + band + height / 2
            axes.text(-pad, middle, row_labels[r], ha="right", va="center", fontsize=8)
    figure.savefig(path)


def _rgb(image: Array) -> Array:
    """An image as RGB in [0, 1]; one channel (or any number but three) as grey."""
    pixels = image / 255 if image.dtype == np.uint8 else np.clip(image, 0, 1)
    return pixels if pixels.shape[-1] == 3 else np.repeat(pixels[..., :1], 3, axis=-1)


def _markdown(sections: dict[str, Any], plots: dict[str, Path]) -> str:
    d, balance, stats = sections["dataset"], sections["class_balance"], sections["statistics"]
    unit = "images" if d["kind"] == "image" else "rows"
    lines = [
        f"# Dataset report: {d['name']}",
        "",
        f"`{d['digest']}`: {d['samples']:,} {unit} of shape "
        f"{'x'.join(map(str, d['sample_shape']))} ({d['dtype']}). {d['description']}",
        "",
        "## Class balance",
        "",
        _table(
            ["class", *balance["counts"]],
            [
                [name, *(f"{c[i]:,}" for c in balance["counts"].values())]
                for i, name in enumerate(balance["classes"])
            ],
        ),
        "",
        "Imbalance (largest class / smallest): "
        + ", ".join(f"{s} {_ratio(r)}" for s, r in balance["imbalance"].items()),
        "",
        f"![class balance]({plots['class_balance'].name})",
        "",
        *_statistics_lines(stats, d["kind"]),
        *_duplicate_lines(sections["exact_duplicates"], sections["near_duplicates"], unit),
        *_leakage_lines(sections["leakage"], d["kind"] == "image", plots, unit),
        *_outlier_lines(sections["outliers"], plots),
    ]
    if "samples" in plots:
        lines += ["## Samples", "", f"![samples per class]({plots['samples'].name})", ""]
    return "\n".join(lines)


def _statistics_lines(stats: dict[str, Any], kind: str) -> list[str]:
    splits = [s for s in SPLITS if s in stats]
    if kind == "image":
        heading = "## Statistics per channel" + (", scaled to [0, 1]" if stats["scaled_to"] else "")
        rows = [
            [s, str(ch), *(f"{stats[s][key][ch]:.4f}" for key in ("mean", "std", "min", "max"))]
            for s in splits
            for ch in range(len(stats[s]["mean"]))
        ]
        return [heading, "", _table(["split", "channel", "mean", "std", "min", "max"], rows), ""]
    features = len(stats[splits[0]]["mean"])
    shown = min(features, 20)
    rows = [
        [str(f), *(f"{stats[s]['mean'][f]:.4g} ± {stats[s]['std'][f]:.4g}" for s in splits)]
        for f in range(shown)
    ]
    missing = ", ".join(f"{s} {stats[s]['not_finite']:,}" for s in splits)
    return [
        "## Statistics per feature (mean ± std)",
        "",
        _table(["feature", *splits], rows),
        "",
        f"{shown} of {features} features shown; all of them, with min and max, are in "
        f"report.json. Values not finite: {missing}.",
        "",
    ]


def _duplicate_lines(exact: dict[str, Any], near: dict[str, Any] | None, unit: str) -> list[str]:
    lines = [
        "## Duplicates",
        "",
        f"- Exact ({exact['method']}): {_count(exact['groups'], 'group')}, "
        f"{exact['samples']:,} {unit}; {_count(exact['conflicting_labels'], 'group')} with "
        "different labels.",
        *(f"  - {_group_line(g)}" for g in exact["examples"][:5]),
    ]
    if near is None:
        return [*lines, "- Near duplicates are not searched in rows: phashes are for images.", ""]
    return [
        *lines,
        f"- Near ({near['method']}): {_count(near['groups'], 'group')}, "
        f"{near['samples']:,} {unit}, the largest {near['largest_group']:,}. Groups of "
        "byte-identical samples alone are exact; groups are chains of near pairs.",
        *(f"  - {_group_line(g)}" for g in near["examples"][:5]),
        "",
    ]


def _group_line(group: dict[str, Any]) -> str:
    pairs = zip(group["indices"][:10], group["splits"][:10], strict=True)
    listed = ", ".join(f"#{index} {split}" for index, split in pairs)
    return f"{group['size']:,}: {listed}" + (", ..." if group["size"] > 10 else "")


def _leakage_lines(
    leakage: dict[str, Any], searched: bool, plots: dict[str, Path], unit: str
) -> list[str]:
    header = ["split", unit, "exact"]
    header += ["near", f"near, pixel correlation >= {ALIKE}"] if searched else []
    rows = []
    for name, leak in leakage.items():
        counts = [leak["exact"], *([leak["near"], leak["near_alike"]] if searched else [])]
        examples = [f"#{e['index']} = train #{e['train_index']}" for e in leak["examples"][:4]]
        rows.append(
            [name, f"{leak['samples']:,}", *(f"{n:,}" for n in counts), ", ".join(examples)]
        )
    lines = [
        f"## Leakage: val and test {unit} that duplicate training {unit}",
        "",
        _table([*header, "examples"], rows),
        "",
        "Every leaked index is in report.json"
        + (", and the near ones counted by phash distance." if searched else "."),
        "",
    ]
    if "leakage" in plots:
        lines += [f"![leaked pairs, the training twin below]({plots['leakage'].name})", ""]
    return lines


def _outlier_lines(outliers: dict[str, Any], plots: dict[str, Path]) -> list[str]:
    rows = [
        [str(o["index"]), o["split"], o["class"], f"{o['score']:.2f}", o["most_unusual"]]
        for o in outliers["top"]
    ]
    return [
        "## Outliers",
        "",
        f"Score: {outliers['method']}.",
        "",
        _table(["index", "split", "class", "score", "most unusual"], rows),
        "",
        f"![top outliers]({plots['outliers'].name})",
        "",
    ]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _count(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _ratio(ratio: float | None) -> str:
    return "n/a (a class is missing)" if ratio is None else f"{ratio:.2f}"
