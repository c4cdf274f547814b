"""The gateway bench's figures, goals, table and JSON.

Every cell (request, concurrency, connection mode, contender) has one run per round. A
figure is computed per round and reported as the median over the rounds; what compares a
proxy with the direct path (added p50, throughput ratio) is taken within each round, against
the direct run of the same round, before the median. The goals compare kapi's medians with
nginx's (or with direct), all from this one run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gatewaybench.client import CellRun

DIRECT = "direct"
KAPI = "kapi"
NGINX = "nginx"
Key = tuple[str, int, str, str]  # request, concurrency, mode, contender


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: medians over the rounds that answered."""

    request: str
    concurrency: int
    mode: str
    contender: str
    rounds: int
    requests: int
    throughput: float | None  # requests per second
    throughput_min: float | None
    throughput_max: float | None
    p50_ms: float | None
    p99_ms: float | None
    added_p50_pct: float | None  # (p50 / direct's p50 - 1) x 100, this round's direct
    added_p50_ms: float | None
    throughput_ratio: float | None  # throughput / direct's, this round's direct
    proxy_cpu_us: float | None  # the proxy's CPU time per request answered
    node_cpu_us: float | None
    client_cpu_us: float | None
    client_connections: int | None
    upstream_connections: int | None
    errors: list[str]


@dataclass(frozen=True, slots=True)
class Goal:
    """kapi's figure against nginx's (`other`) in one cell: `ratio` is kapi / nginx, held
    to `bound`. For throughput both figures are ratios to direct, and kapi's is the one held
    to the bound (nginx's is shown beside it)."""

    name: str
    request: str
    concurrency: int
    mode: str
    kapi: float | None
    other: float | None
    ratio: float | None
    bound: str
    met: bool | None


def round_figures(run: CellRun, direct: CellRun | None) -> dict[str, float | None]:
    """One round's figures of one cell; the comparisons need that round's direct run."""
    if run.error or not run.latencies:
        return {}
    p50, p99 = (float(x) for x in np.percentile(np.asarray(run.latencies), [50, 99]) * 1e3)
    figures: dict[str, float | None] = {
        "throughput": run.throughput,
        "p50_ms": p50,
        "p99_ms": p99,
        **{f"{role}_cpu_us": cpu / run.requests * 1e6 for role, cpu in run.cpu_s.items()},
    }
    if direct is not None and not direct.error and direct.latencies:
        direct_p50 = float(np.percentile(np.asarray(direct.latencies), 50)) * 1e3
        figures["added_p50_ms"] = p50 - direct_p50
        figures["added_p50_pct"] = (p50 / direct_p50 - 1.0) * 100.0
        figures["throughput_ratio"] = run.throughput / direct.throughput
    return figures


def rows(runs: dict[Key, list[CellRun]]) -> list[Row]:
    found = []
    for key, cell_runs in runs.items():
        request, concurrency, mode, contender = key
        direct_runs = runs.get((request, concurrency, mode, DIRECT))
        per_round = [
            round_figures(
                run, None if contender == DIRECT or direct_runs is None else direct_runs[index]
            )
            for index, run in enumerate(cell_runs)
        ]
        answered = [run for run in cell_runs if not run.error and run.latencies]
        last = answered[-1] if answered else None
        rates = _values(per_round, "throughput")

        def median(name: str, figures: list[dict[str, float | None]] = per_round) -> float | None:
            values = _values(figures, name)
            return statistics.median(values) if values else None

        found.append(
            Row(
                request=request,
                concurrency=concurrency,
                mode=mode,
                contender=contender,
                rounds=len(answered),
                requests=sum(run.requests for run in answered),
                throughput=median("throughput"),
                throughput_min=min(rates) if rates else None,
                throughput_max=max(rates) if rates else None,
                p50_ms=median("p50_ms"),
                p99_ms=median("p99_ms"),
                added_p50_pct=median("added_p50_pct"),
                added_p50_ms=median("added_p50_ms"),
                throughput_ratio=median("throughput_ratio"),
                proxy_cpu_us=median("proxy_cpu_us"),
                node_cpu_us=median("node_cpu_us"),
                client_cpu_us=median("client_cpu_us"),
                client_connections=None if last is None else last.client_connections,
                upstream_connections=None if last is None else last.upstream_connections,
                errors=[run.error for run in cell_runs if run.error],
            )
        )
    return found


def _values(figures: list[dict[str, float | None]], name: str) -> list[float]:
    return [value for f in figures if (value := f.get(name)) is not None]


# (name, request, the figure, the bound, True when kapi's figure must be at most bound x
# nginx's; False: kapi's throughput ratio to direct must be at least the bound)
GOALS: list[tuple[str, str, str, float, bool]] = [
    ("proxy CPU/req kapi <= 3x nginx", "small", "proxy_cpu_us", 3.0, True),
    ("proxy CPU/req kapi <= 1.5x nginx", "large", "proxy_cpu_us", 1.5, True),
    ("added p50 kapi <= 3x nginx", "small", "added_p50_pct", 3.0, True),
    ("added p50 kapi <= nginx", "large", "added_p50_pct", 1.0, True),
    ("throughput kapi >= 0.6x direct", "small", "throughput_ratio", 0.6, False),
    ("throughput kapi >= 0.9x direct", "large", "throughput_ratio", 0.9, False),
]
THROUGHPUT_GOAL_CONCURRENCY = 16


def goals(found: list[Row]) -> list[Goal]:
    """Every goal in every (concurrency, mode) cell that has both sides; the throughput
    goals at concurrency 16 only."""
    by_key = {(r.request, r.concurrency, r.mode, r.contender): r for r in found}
    cells = sorted({(r.request, r.concurrency, r.mode) for r in found}, key=_cell_order)
    result = []
    for name, request, figure, bound, against_nginx in GOALS:
        for cell_request, concurrency, mode in cells:
            if cell_request != request:
                continue
            kapi_row = by_key.get((request, concurrency, mode, KAPI))
            if kapi_row is None:
                continue
            kapi = getattr(kapi_row, figure)
            if against_nginx:
                nginx_row = by_key.get((request, concurrency, mode, NGINX))
                if nginx_row is None:
                    continue
                other = getattr(nginx_row, figure)
                ratio, met = _at_most(kapi, other, bound)
                result.append(
                    Goal(name, request, concurrency, mode, kapi, other, ratio, f"<= {bound:g}", met)
                )
            elif concurrency == THROUGHPUT_GOAL_CONCURRENCY:
                nginx_row = by_key.get((request, concurrency, mode, NGINX))
                other = None if nginx_row is None else nginx_row.throughput_ratio
                met = kapi is not None and kapi >= bound
                result.append(
                    Goal(name, request, concurrency, mode, kapi, other, kapi, f">= {bound:g}", met)
                )
    return result


def _at_most(kapi: float | None, other: float | None, bound: float) -> tuple[float | None, bool]:
    """kapi / other and whether kapi <= bound x other. Where nginx added nothing (or less
    than nothing: noise), no ratio is defined, and kapi must not add more than nginx."""
    if kapi is None or other is None:
        return None, False
    if other <= 0:
        return None, kapi <= other
    return kapi / other, kapi <= bound * other


def _cell_order(cell: tuple[str, int, str]) -> tuple[int, int, int]:
    request, concurrency, mode = cell
    return ({"small": 0, "large": 1}.get(request, 2), concurrency, {"shared": 0}.get(mode, 1))


def table(found: list[Row], contenders: list[str]) -> str:
    columns: list[tuple[str, int, Callable[[Row], str]]] = [
        ("request", 7, lambda r: r.request),
        ("conc", 4, lambda r: str(r.concurrency)),
        ("conn", 6, lambda r: r.mode),
        ("contender", 21, lambda r: r.contender),
        ("req/s", 8, lambda r: _num(r.throughput, ".0f")),
        ("x direct", 8, lambda r: _num(r.throughput_ratio, ".2f")),
        ("p50 ms", 7, lambda r: _num(r.p50_ms, ".2f")),
        ("+p50 %", 7, lambda r: _num(r.added_p50_pct, "+.0f")),
        ("p99 ms", 7, lambda r: _num(r.p99_ms, ".2f")),
        ("proxy us", 8, lambda r: _num(r.proxy_cpu_us, ".0f")),
        ("node us", 7, lambda r: _num(r.node_cpu_us, ".0f")),
        ("client us", 9, lambda r: _num(r.client_cpu_us, ".0f")),
        ("conns", 5, lambda r: _connections(r)),
    ]
    header = " ".join(
        f"{title:<{width}}" if index < 4 else f"{title:>{width}}"
        for index, (title, width, _) in enumerate(columns)
    )
    lines = [header, "-" * len(header)]
    order = {name: index for index, name in enumerate(contenders)}
    previous: tuple[str, int, str] | None = None
    for row in sorted(
        found,
        key=lambda r: (*_cell_order((r.request, r.concurrency, r.mode)), order[r.contender]),
    ):
        cell = (row.request, row.concurrency, row.mode)
        if previous is not None and cell != previous:
            lines.append("")
        previous = cell
        if row.rounds == 0:
            lines.append(
                f"{row.request:<7} {row.concurrency:<4} {row.mode:<6} {row.contender:<21}"
                f" FAILED: {_first_line(row.errors)}"
            )
            continue
        lines.append(
            " ".join(
                f"{get(row):<{width}}" if index < 4 else f"{get(row):>{width}}"
                for index, (_, width, get) in enumerate(columns)
            )
        )
    return "\n".join(lines)


def goal_table(found: list[Goal]) -> str:
    header = f"{'goal':<34} {'request':<7} {'conc':>4} {'conn':<6} {'kapi':>8} {'nginx':>8} "
    header += f"{'ratio':>6} {'bound':<6} met"
    lines = [header, "-" * len(header)]
    for goal in found:
        met = "-" if goal.met is None else "met" if goal.met else "MISSED"
        lines.append(
            f"{goal.name:<34} {goal.request:<7} {goal.concurrency:>4} {goal.mode:<6} "
            f"{_num(goal.kapi, '.2f'):>8} {_num(goal.other, '.2f'):>8} "
            f"{_num(goal.ratio, '.2f'):>6} {goal.bound:<6} {met}"
        )
    met_count = sum(1 for goal in found if goal.met)
    lines.append(f"{met_count} of {len(found)} met")
    return "\n".join(lines)


def _connections(row: Row) -> str:
    if row.client_connections is None:
        return "-"
    if row.upstream_connections is None:
        return str(row.client_connections)
    return f"{row.client_connections}/{row.upstream_connections}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _first_line(errors: list[str]) -> str:
    text = errors[0].strip().splitlines() if errors else ["?"]
    return text[-1][:120] if text else "?"


def write_json(
    path: Path,
    found: list[Row],
    goal_rows: list[Goal],
    runs: dict[Key, list[CellRun]],
    meta: dict[str, object],
) -> None:
    """The rows, the goals, every round's figures (not every latency) and the environment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rounds = []
    for (request, concurrency, mode, contender), cell_runs in runs.items():
        direct_runs = runs.get((request, concurrency, mode, DIRECT))
        for index, run in enumerate(cell_runs):
            direct = None if contender == DIRECT or direct_runs is None else direct_runs[index]
            rounds.append(
                {
                    "round": index + 1,
                    "request": request,
                    "concurrency": concurrency,
                    "mode": mode,
                    "contender": contender,
                    "requests": run.requests,
                    "seconds": run.seconds,
                    "cpu_s": run.cpu_s,
                    "client_connections": run.client_connections,
                    "upstream_connections": run.upstream_connections,
                    "error": run.error,
                    **round_figures(run, direct),
                }
            )
    document = {
        **meta,
        "rows": [asdict(row) for row in found],
        "goals": [asdict(goal) for goal in goal_rows],
        "rounds": rounds,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
