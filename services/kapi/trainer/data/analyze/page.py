"""The report's files: report.json (the summary and every section) and report.md (one page
that embeds the plots by relative link)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kapi.trainer.data.analyze.leakage import ALIKE
from kapi.trainer.data.analyze.report import counted, ratio_text
from kapi.trainer.data.store import SPLITS


def write_json(summary: dict[str, Any], sections: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps({"summary": summary, **sections}, indent=2))
    return path


def write_markdown(sections: dict[str, Any], plots: dict[str, Path], out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text(_markdown(sections, plots))
    return path


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
        + ", ".join(f"{s} {ratio_text(r)}" for s, r in balance["imbalance"].items()),
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
        f"- Exact ({exact['method']}): {counted(exact['groups'], 'group')}, "
        f"{exact['samples']:,} {unit}; {counted(exact['conflicting_labels'], 'group')} with "
        "different labels.",
        *(f"  - {_group_line(g)}" for g in exact["examples"][:5]),
    ]
    if near is None:
        return [*lines, "- Near duplicates are not searched in rows: phashes are for images.", ""]
    return [
        *lines,
        f"- Near ({near['method']}): {counted(near['groups'], 'group')}, "
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
    header = ["split, in", unit, "exact"]
    header += ["near", f"near, pixel correlation >= {ALIKE}"] if searched else []
    rows = []
    for leak in leakage.values():
        counts = [leak["exact"], *([leak["near"], leak["near_alike"]] if searched else [])]
        examples = [
            f"#{e['index']} = {leak['against']} #{e['partner_index']}" for e in leak["examples"][:4]
        ]
        where = f"{leak['split']} in {leak['against']}"
        rows.append(
            [where, f"{leak['samples']:,}", *(f"{n:,}" for n in counts), ", ".join(examples)]
        )
    lines = [
        f"## Leakage: val and test {unit} that duplicate training {unit}, and test {unit} "
        f"that duplicate val {unit}",
        "",
        _table([*header, "examples"], rows),
        "",
        "Every leaked index is in report.json"
        + (", and the near ones counted by phash distance." if searched else "."),
        "",
    ]
    if "leakage" in plots:
        lines += [f"![leaked pairs, the twin below]({plots['leakage'].name})", ""]
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
