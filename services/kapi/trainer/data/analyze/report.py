"""What `analyze` returns: the files it wrote and the summary, the report's headline
numbers, with the lines that print it on the terminal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapi.trainer.data.analyze.leakage import ALIKE


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
            f"duplicates: exact {counted(exact['groups'], 'group')} ({exact['samples']:,} {unit})"
        )
        if near is None:
            duplicates += "; near duplicates not searched in rows"
        else:
            duplicates += (
                f", near {counted(near['groups'], 'group')} ({near['samples']:,} {unit}, "
                f"phash distance <= {near['threshold']})"
            )
        lines = [
            f"{s['name']} {s['digest'][:19]}: {s['samples']:,} {unit}, {s['classes']} classes",
            f"class balance: {splits}; imbalance max/min {ratio_text(s['imbalance'])}",
            duplicates,
        ]
        for leak in s["leakage"].values():
            kinds = f"exact {leak['exact']:,}"
            if near is not None:
                kinds += f", near {leak['near']:,}"
            if leak["near"]:
                kinds += f"; {leak['near_alike']:,} of those alike in pixels, r >= {ALIKE}"
            total = leak["exact"] + leak["near"]
            against = "training" if leak["against"] == "train" else leak["against"]
            lines.append(
                f"leakage: {total:,} {leak['split']} {unit} duplicate {against} {unit} ({kinds})"
            )
        top = ", ".join(f"#{o['index']} {o['class']} {o['score']:.1f}" for o in s["outliers"])
        lines.append(f"outliers (robust z): {top}")
        return lines


def summary(sections: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of the report's sections."""
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
            s: {key: leak[key] for key in ("split", "against", "exact", "near", "near_alike")}
            for s, leak in sections["leakage"].items()
        },
        "outliers": [
            {key: o[key] for key in ("index", "class", "score")}
            for o in sections["outliers"]["top"][:5]
        ],
    }


def counted(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def ratio_text(ratio: float | None) -> str:
    return "n/a (a class is missing)" if ratio is None else f"{ratio:.2f}"
