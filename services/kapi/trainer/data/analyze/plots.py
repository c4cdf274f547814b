"""The report's PNGs: class balance, the top outliers, a sample grid per class and the
leaked pairs (images), drawn on matplotlib's Agg canvas without pyplot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kapi.trainer.data.analyze.arrays import Array, Ints

LEAK_PLOT = 8  # leaked pairs shown

Cell = tuple[Array, str]


def plot_all(
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
    leaked = [(leak, e) for leak in sections["leakage"].values() for e in leak["examples"]]
    if leaked:
        # Exact first, then the near pairs most alike: those most likely to be one image.
        leaked.sort(
            key=lambda pair: (pair[1]["kind"] != "exact", -pair[1].get("pixel_correlation", 1))
        )
        pairs = leaked[:LEAK_PLOT]
        plots["leakage"] = out / "leakage.png"
        _image_grid(
            [
                [(x[e["index"]], f"{s['split']} #{e['index']}\n{_likeness(e)}") for s, e in pairs],
                [
                    (x[e["partner_index"]], f"{s['against']} #{e['partner_index']}")
                    for s, e in pairs
                ],
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
