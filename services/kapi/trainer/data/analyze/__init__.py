"""What is in a dataset version, before anything trains on it: `kapi data analyze NAME`.

`analyze` writes OUT/report.json (everything), PNG plots and OUT/report.md (one page that
embeds the plots by relative link), and returns a `Report` whose `summary_lines` are for the
terminal. Sample indices are positions in `Dataset.arrays()`. Each analysis has its module,
whose docstring says how it is done:

- `stats`: class balance per split, statistics per channel (images) or feature (rows).
- `duplicates`: exact duplicates (sha256) and, in images, near ones (phash within
  `near_threshold` bits, found through pigeonhole bands that miss no pair).
- `leakage`: val and test samples that duplicate a training sample, with the pixel
  correlation of the near pairs.
- `outliers`: robust z-scores within the class; cheap, and it finds blank, saturated and
  foreign samples.
- `plots` draws the PNGs, `page` writes report.json and report.md, and `report` holds the
  `Report` and its summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument
from kapi.trainer.data.analyze.duplicates import (
    NearPairs,
    content_ids,
    exact_duplicates,
    phashes,
)
from kapi.trainer.data.analyze.leakage import ALIKE, find_leakage
from kapi.trainer.data.analyze.outliers import top_outliers
from kapi.trainer.data.analyze.page import write_json, write_markdown
from kapi.trainer.data.analyze.plots import plot_all
from kapi.trainer.data.analyze.report import Report, summary
from kapi.trainer.data.analyze.stats import channel_stats, class_balance, describe, feature_stats
from kapi.trainer.data.store import Dataset

__all__ = ["ALIKE", "NEAR_THRESHOLD", "PER_CLASS", "TOP_OUTLIERS", "Report", "analyze"]

NEAR_THRESHOLD = 4
TOP_OUTLIERS = 16
PER_CLASS = 8  # samples per class in the sample grid


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
    content = content_ids(x)
    hashes = phashes(x) if images else None
    near = NearPairs.find(hashes, near_threshold) if hashes is not None else None
    sections: dict[str, Any] = {
        "dataset": describe(dataset, x, split),
        "class_balance": class_balance(y, split, dataset.classes),
        "statistics": channel_stats(x, split) if images else feature_stats(x, split),
        "exact_duplicates": exact_duplicates(content, y, split),
        "near_duplicates": None if near is None else near.groups(content, split),
        "leakage": find_leakage(x, content, split, near),
        "outliers": top_outliers(x, y, split, dataset.classes, top_k),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_all(sections, x, y, dataset.classes, out_dir, per_class)
    headline = summary(sections)
    json_path = write_json(headline, sections, out_dir)
    markdown_path = write_markdown(sections, plots, out_dir)
    return Report(out_dir, json_path, markdown_path, plots, headline)
