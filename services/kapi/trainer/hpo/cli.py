"""`kapi train --hpo`: the study's options, and its report on the terminal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument


def add_arguments(train: argparse.ArgumentParser) -> None:
    hpo = train.add_argument_group("HPO (with --hpo)")
    hpo.add_argument("--hpo", action="store_true", help="run a multi-objective Optuna study")
    hpo.add_argument("--trials", type=int, help="trials this run adds (default 20)")
    hpo.add_argument("--study", help="the study's name (default hpo-DATASET)")
    hpo.add_argument("--storage", help="Optuna storage URL (default sqlite in --out)")
    hpo.add_argument("--requirements", type=Path, help="the requirements spec (YAML or JSON)")
    hpo.add_argument("--profile", help="the objectives' target (default: the spec's first)")
    hpo.add_argument("--runtime", choices=["onnxruntime", "openvino"], help="timed on")
    hpo.add_argument("--models", help="architectures to search, comma-separated")
    hpo.add_argument("--widths", help="width multipliers to search, comma-separated")
    hpo.add_argument("--depths", help="depth multipliers to search, comma-separated")
    hpo.add_argument("--batch-sizes", help="batch sizes to search, comma-separated")
    hpo.add_argument("--objectives", help="accuracy,latency[,weights,memory,energy]")
    hpo.add_argument("--sampler", choices=["nsga2", "tpe"])
    hpo.add_argument("--population", type=int, help="NSGA-II's generation size")
    hpo.add_argument("--workers", type=int, help="processes sharing the study")
    hpo.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    hpo.add_argument("--choose", choices=["most-accurate", "fastest", "smallest"])


def run(args: argparse.Namespace, store: Any) -> None:
    from kapi.core.requirements import load_requirements
    from kapi.trainer.hpo.config import load_config
    from kapi.trainer.hpo.study import print_line, run_hpo, silent
    from kapi.trainer.push import check_push, push_from_args

    if args.requirements is None:
        raise InvalidArgument("--hpo needs --requirements FILE: its targets are the objectives")
    if getattr(args, "nproc", None):
        raise InvalidArgument("--hpo runs its trials in --workers processes; drop --nproc")
    if args.resume or args.model:
        raise InvalidArgument(
            "--hpo searches the architectures itself (--models) and resumes through "
            "--study and --storage; drop --model and --resume"
        )
    searched = {  # what a study samples or fixes itself: given, it would be ignored
        "--batch-size": args.batch_size, "--lr": args.lr, "--weight-decay": args.weight_decay,
        "--width": args.width, "--depth": args.depth, "--patience": args.patience,
        "--device": args.device,
    }  # fmt: skip
    given = [flag for flag, value in searched.items() if value is not None]
    if given:
        raise InvalidArgument(
            f"--hpo searches or fixes {', '.join(given)} itself (see --batch-sizes, --widths, "
            "--depths); drop them"
        )
    fields: dict[str, Any] = {
        "dataset": args.dataset,
        "dataset_version": args.version,
        "study": args.study or f"hpo-{args.dataset}",
        "storage": args.storage,
        "trials": args.trials,
        "requirements": load_requirements(args.requirements),
        "profile": args.profile,
        "runtime": args.runtime,
        "models": _items(args.models, str),
        "widths": _items(args.widths, float),
        "depths": _items(args.depths, float),
        "batch_sizes": _items(args.batch_sizes, int),
        "objectives": _items(args.objectives, str),
        "sampler": args.sampler,
        "population": args.population,
        "workers": args.workers,
        "epochs": args.epochs,
        "train_samples": args.train_samples,
        "seed": args.seed,
        "threads": args.threads,
        "choose": args.choose,
    }
    if args.no_prune:
        fields["prune"] = False
    config = load_config(**{k: v for k, v in fields.items() if v is not None})
    check_push(args)
    out = args.out or Path("kapi-runs") / config.study
    result = run_hpo(config, store, out, log=silent if args.json else print_line)
    if args.json:
        pushed = push_from_args(args, result.bundle)
        print(json.dumps({"bundle": str(result.bundle), **result.summary, **pushed}, indent=2))
        return
    print(f"Pareto front ({len(result.front)} feasible trials), {config.primary_profile()}:")
    names = list(result.summary["objectives"])
    header = "  trial  model            width depth  " + "  ".join(f"{n:>9}" for n in names)
    print(header)
    for row in result.front:
        mark = "*" if row["number"] == result.chosen["number"] else " "
        cells = "  ".join(f"{row['values'][n]:>9.4g}" for n in names)
        params = row["params"]
        print(
            f" {mark}{row['number']:>5}  {params['model']:<16} {params['width']:<5} "
            f"{params['depth']:<5} {cells}"
        )
    chosen = result.chosen
    print(
        f"chosen ({config.choose}): trial {chosen['number']}, val accuracy "
        f"{chosen['values']['accuracy']:.4f}, test accuracy {chosen['test_accuracy']:.4f}, "
        f"p95 {chosen['targets'][0]['latency_p95_ms']:.3f} ms ({chosen['targets'][0]['source']})"
    )
    again = result.summary.get("remeasured")
    if again:
        print(
            f"re-measured: p95 {again['latency_p95_ms']:.3f} ms ({again['ratio_p95']:.2f}x the "
            f"study's), p50 {again['latency_p50_ms']:.3f} ms ({again['ratio_p50']:.2f}x)"
        )
    model_error = result.summary["cost_model"]
    if model_error.get("checked"):
        print(
            f"cost model on {model_error['profile']}: mean error "
            f"{model_error['mean_abs_error']:.0%} over {model_error['checked']} networks"
        )
    print(f"front {out / 'front.json'}, plot {out / 'front.png'}, bundle {result.bundle}")
    push_from_args(args, result.bundle)


def refuse_without_hpo(args: argparse.Namespace) -> None:
    """The study's flags on a plain `kapi train` would be ignored: refused instead."""
    flags = [
        "trials", "study", "storage", "profile", "runtime", "models", "widths", "depths",
        "batch_sizes", "objectives", "sampler", "population", "workers", "choose",
    ]  # fmt: skip
    given = ["--" + name.replace("_", "-") for name in flags if getattr(args, name) is not None]
    if args.no_prune:
        given.append("--no-prune")
    if args.requirements is not None and not args.push:
        given.append("--requirements (without --hpo or --push)")
    if (args.repository or args.token) and not args.push:
        given.append("--repository/--token (without --push)")
    if given:
        raise InvalidArgument(f"{', '.join(given)}: only with --hpo")


def _items(text: str | None, kind: type) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise InvalidArgument(f"{text!r}: {exc}") from exc
