"""The bench's output: one row per (model, contender, concurrency), the ratios the issue sets
goals for (and a few shown without one), a printed table and a JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nodebench.load import LoadResult
from nodebench.models import MODELS


@dataclass(frozen=True, slots=True)
class Row:
    model: str
    contender: str
    concurrency: int
    result: LoadResult


@dataclass(frozen=True, slots=True)
class Ratio:
    """Throughput of `numerator` over `denominator`, both measured in this run. An
    informational ratio has no goal: `goal` is "-" and `met` is None."""

    name: str
    value: float
    goal: str
    met: bool | None


Goal = tuple[str, str, int, str, str, float | None]


def _pair(model: str, numerator: str, denominator: str, minimum: float | None) -> list[Goal]:
    """The same ratio at concurrency 1 and 8."""
    return [
        (f"{model} {numerator} / {denominator}, c={c}", model, c, numerator, denominator, minimum)
        for c in (1, 8)
    ]


# (name, model, concurrency, numerator, denominator, minimum the goal asks for; None: no goal)
RATIO_GOALS: list[Goal] = [
    *_pair("convnet", "kapi", "in-process", 0.85),
    *_pair("convnet", "kapi", "triton", 1.0),
    *_pair("convnet", "kapi", "mlserver", 1.0),
    *_pair("convnet-small", "kapi", "triton", 1.0),
    *_pair("convnet-small", "kapi-shm", "in-process", 0.9),
    # Transport-bound: plain gRPC shown for what the transport costs, not held to a goal.
    *_pair("convnet-small", "kapi", "in-process", None),
    *_pair("convnet-small", "kapi", "mlserver", None),
    *_pair("convnet", "kapi-shm", "in-process", None),
    *_pair("addsub", "kapi", "triton", 1.0),
    *_pair("addsub", "kapi", "mlserver", None),
    *_pair("mlp", "kapi", "mlserver", 1.0),
    (
        "mlp kapi+batching / mlserver+batching, c=8",
        "mlp",
        8,
        "kapi+batching",
        "mlserver+batching",
        1.0,
    ),
    *_pair("mlp", "kapi", "triton", None),
    (
        "mlp kapi+batching / triton+batching, c=8",
        "mlp",
        8,
        "kapi+batching",
        "triton+batching",
        None,
    ),
    ("mlp kapi batching on / off, c=8", "mlp", 8, "kapi+batching", "kapi", 2.0),
    # REST beside gRPC on the same node: what the other protocol costs.
    *(goal for model in MODELS for goal in _pair(model, "kapi-rest", "kapi", None)),
]


def ratios(rows: list[Row]) -> list[Ratio]:
    """Every ratio whose two rows were measured (a run without a peer skips its ratios)."""
    throughput = {(r.model, r.contender, r.concurrency): r.result.throughput for r in rows}
    found: list[Ratio] = []
    for name, model, concurrency, numerator, denominator, minimum in RATIO_GOALS:
        top = throughput.get((model, numerator, concurrency))
        bottom = throughput.get((model, denominator, concurrency))
        if top is None or bottom is None:
            continue
        value = top / bottom
        found.append(Ratio(name, value, *_goal(value, minimum)))
    return found


def _goal(value: float, minimum: float | None) -> tuple[str, bool | None]:
    if minimum is None:
        return "-", None
    if minimum == 1.0:
        return "> 1 (kapi ahead)", value > 1.0
    return f">= {minimum:g}", value >= minimum


def table(rows: list[Row]) -> str:
    """One line a row; `server CPU` is the server's CPU microseconds per request (its whole
    process tree), "-" for the in-process contender."""
    header = f"{'model':<13} {'contender':<18} {'conc':>4} {'req/s':>9} {'p50 ms':>8} "
    header += f"{'p99 ms':>8} {'requests':>9} {'server CPU us/req':>17}"
    lines = [header, "-" * len(header)]
    for row in rows:
        r = row.result
        cpu = "-" if r.server_cpu_us is None else f"{r.server_cpu_us:.0f}"
        lines.append(
            f"{row.model:<13} {row.contender:<18} {row.concurrency:>4} {r.throughput:>9.1f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.requests:>9} {cpu:>17}"
        )
    return "\n".join(lines)


def ratio_table(found: list[Ratio]) -> str:
    lines = [f"{'ratio (throughput)':<44} {'value':>6}  {'goal':<17} met"]
    for ratio in found:
        met = "-" if ratio.met is None else "yes" if ratio.met else "NO"
        lines.append(f"{ratio.name:<44} {ratio.value:>6.2f}  {ratio.goal:<17} {met}")
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], found: list[Ratio], meta: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **meta,
        "rows": [
            {
                "model": row.model,
                "contender": row.contender,
                "concurrency": row.concurrency,
                **asdict(row.result),
            }
            for row in rows
        ],
        "ratios": [asdict(ratio) for ratio in found],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
