"""A study's outcome: per-trial records, the feasible front, the chosen trial's bundle
(timed again), the summary and the plot."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna

from kapi.core.errors import FailedPrecondition
from kapi.core.files import replace_text
from kapi.core.requirements import Requirements
from kapi.trainer.hpo.config import OBJECTIVES, HpoConfig
from kapi.trainer.hpo.measure import measure
from kapi.trainer.hpo.objective import redact

CHOICE_RULES = {  # the spec's rule for the one bundle: among the feasible front
    "most-accurate": lambda r: (-r["values"]["accuracy"], r["targets"][0]["latency_p95_ms"]),
    "fastest": lambda r: (r["targets"][0]["latency_p95_ms"], -r["values"]["accuracy"]),
    "smallest": lambda r: (r["targets"][0]["weights_kb"], -r["values"]["accuracy"]),
}


@dataclass(frozen=True)
class HpoResult:
    out: Path
    front: list[dict[str, Any]]
    chosen: dict[str, Any]
    bundle: Path
    summary: dict[str, Any]


def _record(trial: optuna.trial.FrozenTrial, names: list[str]) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "params": trial.user_attrs.get("params", trial.params),
        "values": dict(zip(names, trial.values, strict=True)) if trial.values else None,
        "constraints": trial.constraints,
        "feasible": bool(trial.values) and all(v <= 0 for v in trial.constraints.values()),
        "trained": trial.user_attrs.get("trained", False),
        "skipped": trial.user_attrs.get("skipped"),
        "val_accuracy_curve": trial.user_attrs.get("val_accuracy_curve", []),
        "test_accuracy": trial.user_attrs.get("test_accuracy"),
        "bundle": trial.user_attrs.get("bundle"),
        "targets": trial.user_attrs.get("targets", []),
        "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else None,
    }


def finish(
    config: HpoConfig, study: optuna.Study, out: Path, *, log: Callable[[str], None] = print
) -> HpoResult:
    """Write trials.json, front.json, front.png and hpo.json, and the chosen trial's bundle
    (FailedPrecondition, naming the constraints, when no trial is feasible)."""
    names = list(study.user_attrs.get("objectives") or config.objective_names())
    trials = study.get_trials(deepcopy=False)
    records = [_record(t, names) for t in trials]
    _write_json(out / "trials.json", records)
    front_numbers = {t.number for t in study.best_trials}
    front = [r for r in records if r["number"] in front_numbers and r["feasible"]]
    front.sort(key=lambda r: r["targets"][0]["latency_p95_ms"])
    _write_json(out / "front.json", front)
    summary: dict[str, Any] = {
        "study": config.study,
        "storage": redact(config.storage) or str(out / "study.db"),
        "objectives": {name: OBJECTIVES[name][0] for name in names},
        "profile": config.primary_profile(),
        "trials": _count_states(records),
        "front": [r["number"] for r in front],
        "cost_model": _cost_model_error(records),
        "rule": config.choose,
    }
    if not front:
        summary["unmet"] = _unmet(records, config.requirements)
        _write_json(out / "hpo.json", summary)
        _plot(records, front, None, names, out / "front.png")
        detail = "; ".join(summary["unmet"]) or "no trial completed"
        raise FailedPrecondition(
            f"no trial met every constraint: {detail} (report {out / 'hpo.json'})"
        )
    chosen = sorted(front, key=CHOICE_RULES[config.choose])[0]
    source = Path(chosen["bundle"] or "")
    if not (source / "model.onnx").is_file():
        raise FailedPrecondition(
            f"the chosen trial {chosen['number']}'s bundle is not at {source}: a run with "
            "another --out trained it; run this study from that folder"
        )
    bundle = _replace_dir(source, out / "bundle")
    primary = chosen["targets"][0]
    summary["chosen"] = chosen
    if primary["source"].startswith("measured"):
        again = measure(
            bundle / "model.onnx",
            config.runtime,
            threads=config.measure_threads,
            runs=config.measure_runs * 5,
        )
        summary["remeasured"] = {
            "latency_p50_ms": again.latency_p50_ms,
            "latency_p95_ms": again.latency_p95_ms,
            "study_latency_p95_ms": primary["latency_p95_ms"],
            "ratio_p95": again.latency_p95_ms / primary["latency_p95_ms"],
            "ratio_p50": again.latency_p50_ms / primary["latency_p50_ms"],
        }
    _write_json(out / "hpo.json", summary)
    _plot(records, front, chosen, names, out / "front.png")
    return HpoResult(out=out, front=front, chosen=chosen, bundle=bundle, summary=summary)


def _count_states(records: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "feasible": 0, "untrained": 0}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
        counts["feasible"] += r["feasible"]
        counts["untrained"] += r["state"] == "complete" and not r["trained"]
    return counts


def _cost_model_error(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimate against the measurement, once a network (costed once a study)."""
    by_architecture = {
        (row["flops"], row["parameters"]): row["cost_model_error"]
        for r in records
        for row in r["targets"]
        if "measured_on" in row
    }
    errors = list(by_architecture.values())
    if not errors:
        return {"checked": 0, "note": "no target profile runs here: every figure is estimated"}
    absolute = sorted(abs(e) for e in errors)
    return {
        "checked": len(errors),
        "profile": next(
            (row["measured_on"] for r in records for row in r["targets"] if "measured_on" in row),
            None,
        ),
        "mean_abs_error": sum(absolute) / len(absolute),
        "median_abs_error": absolute[len(absolute) // 2],
        "max_abs_error": absolute[-1],
        "compared": "estimated latency against the measured median (p50)",
    }


def _unmet(records: list[dict[str, Any]], requirements: Requirements) -> list[str]:
    """Each constraint that some completed trial broke: how many, and the best value seen."""
    done = [r for r in records if r["state"] == "complete"]
    lines = []
    keys = sorted({k for r in done for k in r["constraints"]})
    for key in keys:
        counted = [r for r in done if key in r["constraints"]]
        if key == "accuracy.min":  # an untrained trial's accuracy is no measurement
            counted = [r for r in counted if r["trained"]]
        over = [r["constraints"][key] for r in counted if r["constraints"][key] > 0]
        if over:
            lines.append(
                f"{key}: {len(over)} of {len(counted)} trials over budget (the closest by "
                f"{min(over):.4g})"
            )
    return lines


def _replace_dir(source: Path, target: Path) -> Path:
    """A copy of `source` at `target`, swapped in whole: a reader sees the old or the new."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        staging.chmod(0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _plot(
    records: list[dict[str, Any]],
    front: list[dict[str, Any]],
    chosen: dict[str, Any] | None,
    names: list[str],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    done = [r for r in records if r["values"]]
    infeasible = [r for r in done if not r["feasible"] and r["trained"]]
    untrained = [r for r in done if not r["trained"]]
    feasible = [r for r in done if r["feasible"]]
    for group, style, label in (
        (untrained, {"marker": "+", "color": "tab:orange"}, "over budget, not trained"),
        (infeasible, {"marker": "x", "color": "0.6"}, "infeasible"),
        (feasible, {"marker": "o", "color": "tab:blue", "alpha": 0.6}, "feasible"),
    ):
        if group:
            axes.scatter(
                [r["targets"][0]["latency_p95_ms"] for r in group],
                [r["values"]["accuracy"] for r in group],
                label=label,
                **style,
            )
    if front:
        axes.plot(
            [r["targets"][0]["latency_p95_ms"] for r in front],
            [r["values"]["accuracy"] for r in front],
            "-o",
            color="tab:red",
            label="Pareto front",
        )
    if chosen is not None:
        axes.scatter(
            [chosen["targets"][0]["latency_p95_ms"]],
            [chosen["values"]["accuracy"]],
            marker="*",
            s=300,
            color="gold",
            edgecolors="black",
            zorder=5,
            label=f"chosen (trial {chosen['number']})",
        )
    axes.set_xlabel("latency p95 (ms, batch 1)")
    axes.set_ylabel("validation accuracy")
    axes.set_xscale("log")
    axes.grid(True, alpha=0.3)
    if done:
        axes.legend(loc="lower right")
    axes.set_title(f"{len(done)} trials; objectives {', '.join(names)}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write_json(path: Path, value: Any) -> None:
    replace_text(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON: {type(value)}")
