"""The trainer's commands: `kapi data ingest|list|show|analyze` and `kapi train`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from kapi.core.errors import InvalidArgument

DEFAULT_ROOT = "kapi-data"  # beside where it runs, unless --root or KAPI_DATA_ROOT says


def add_commands(commands: Any) -> None:
    data = commands.add_parser("data", help="datasets: ingest, list, show, analyze")
    actions = data.add_subparsers(dest="action", required=True)

    ingest = actions.add_parser("ingest", help="store a version of a dataset")
    ingest.add_argument(
        "source",
        help="fashion-mnist, mnist-subset, sklearn-digits, a folder of class folders, "
        "a .csv (a label column) or a .npz (x, y[, classes])",
    )
    ingest.add_argument("--name", required=True, help="the dataset's name (DNS-label style)")
    ingest.add_argument("--seed", type=int, default=0, help="of the stratified split")
    ingest.add_argument("--val", type=float, default=0.1, help="share for validation")
    ingest.add_argument("--test", type=float, default=0.1, help="share for test (unless given)")
    ingest.add_argument("--resize", help="HxW, e.g. 32x32")
    ingest.add_argument("--channels", choices=["grayscale", "rgb"])
    _common(ingest)
    ingest.set_defaults(handler=_ingest)

    listing = actions.add_parser("list", help="datasets and their versions")
    _common(listing)
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one version's record")
    show.add_argument("name")
    show.add_argument("--version", help="a digest or its first hex digits (default: latest)")
    _common(show)
    show.set_defaults(handler=_show)

    analyze = actions.add_parser("analyze", help="write a report on a dataset version")
    analyze.add_argument("name")
    analyze.add_argument("--version", help="a digest or its first hex digits (default: latest)")
    analyze.add_argument("--out", type=Path, help="default: ROOT/NAME/<version>/report")
    _common(analyze)
    analyze.set_defaults(handler=_analyze)
    _add_train(commands)


def _add_train(commands: Any) -> None:
    train = commands.add_parser("train", help="train a zoo model on a dataset, write its bundle")
    train.add_argument("--dataset", required=True, help="a stored dataset's name")
    train.add_argument("--version", help="a digest or its first hex digits (default: latest)")
    train.add_argument("--model", help="a zoo architecture, e.g. small_cnn (not with --hpo)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="AdamW's learning rate")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--width", type=float, help="channel multiplier")
    train.add_argument("--depth", type=float, help="block multiplier")
    train.add_argument("--seed", type=int)
    train.add_argument("--patience", type=int, help="epochs without a better val accuracy")
    train.add_argument("--train-samples", type=int, help="a stratified subset of train")
    train.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=int, help="torch threads (default: cores / processes)")
    train.add_argument("--out", type=Path, help="default: ./kapi-runs/DATASET-MODEL")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--push", metavar="MODEL", help="push the bundle to the repository")
    train.add_argument("--repository", help="with --push: URL (default $KAPI_REPOSITORY_URL)")
    train.add_argument("--token", help="with --push: a token (default $KAPI_TOKEN)")
    train.add_argument("--nproc", type=int, help="data-parallel processes, started by torchrun")
    from kapi.trainer.hpo.cli import add_arguments as add_hpo_arguments

    add_hpo_arguments(train)
    _common(train)
    train.set_defaults(handler=_train)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, help=f"default $KAPI_DATA_ROOT or ./{DEFAULT_ROOT}")
    parser.add_argument("--json", action="store_true", help="JSON instead of text")


def _store(args: argparse.Namespace) -> Any:
    from kapi.trainer.data.store import DatasetStore

    return DatasetStore(args.root or Path(os.environ.get("KAPI_DATA_ROOT", DEFAULT_ROOT)))


def _ingest(args: argparse.Namespace) -> None:
    from kapi.trainer.data.sources import open_source

    resize = _size(args.resize) if args.resize else None
    samples = open_source(args.source).load()
    dataset, new = _store(args).ingest(
        args.name,
        samples,
        seed=args.seed,
        val=args.val,
        test=args.test,
        resize=resize,
        channels=args.channels,
    )
    if args.json:
        print(json.dumps({"new": new, **dataset.meta}, indent=2))
        return
    counts = {split: sum(c.values()) for split, c in dataset.meta["counts"].items()}
    state = "stored" if new else "already there (the same data, split and preprocessing)"
    print(f"{dataset.name} {dataset.digest[:19]}: {state}")
    print(f"  {dataset.meta['description']}; {len(dataset.classes)} classes; samples {counts}")
    print(f"  {dataset.path}")


def _list(args: argparse.Namespace) -> None:
    store = _store(args)
    rows = {name: store.versions(name) for name in store.names()}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for name, versions in rows.items():
        for number, version in enumerate(versions, start=1):
            print(
                f"{name:<20} v{number:<3} {version['digest'][:19]}  {version['samples']:>7} "
                f"samples  {version['created_at'][:19]}  {version['description']}"
            )


def _show(args: argparse.Namespace) -> None:
    dataset = _store(args).get(args.name, args.version)
    print(json.dumps(dataset.meta, indent=2))


def _analyze(args: argparse.Namespace) -> None:
    from kapi.trainer.data.analyze import analyze

    dataset = _store(args).get(args.name, args.version)
    report = analyze(dataset, args.out or dataset.path / "report")
    if args.json:
        print(json.dumps(json.loads(report.json_path.read_text()), indent=2))
        return
    print(f"{dataset.name} {dataset.digest[:19]}: report in {report.markdown_path}")
    for line in report.summary_lines():
        print(f"  {line}")


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit()) or not int(height) or not int(width):
        raise InvalidArgument(f"--resize {text!r}: expected HxW, e.g. 32x32")
    return int(height), int(width)


def _train(args: argparse.Namespace) -> None:
    if args.hpo:
        from kapi.trainer.hpo.cli import run

        run(args, _store(args))
        return
    from kapi.trainer.hpo.cli import refuse_without_hpo

    refuse_without_hpo(args)
    if args.model is None:
        raise InvalidArgument("--model is required (or --hpo, which searches the zoo)")
    from kapi.core.errors import AlreadyExists
    from kapi.trainer.bundle import write_bundle
    from kapi.trainer.distributed import World, relaunch
    from kapi.trainer.push import check_push, push_from_args
    from kapi.trainer.training import EpochMetrics, TrainConfig, train, validate

    given = {
        "dataset_version": args.version,
        **{key: getattr(args, key) for key in _TRAIN_OPTIONS},
    }
    config = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        **{key: value for key, value in given.items() if value is not None},
    )
    out = args.out or Path("kapi-runs") / f"{args.dataset}-{args.model}"
    target = out / "bundle"
    if target.exists():
        raise AlreadyExists(f"{target} exists already; choose another --out")
    world = World.from_environment()
    if args.nproc is not None:  # this command again, under torchrun
        if world.size > 1:
            raise InvalidArgument("--nproc starts torchrun; under torchrun, leave it out")
        processes = World.on_this_machine(args.nproc)
        validate(config, _store(args), processes)
        options = {k: v for k, v in vars(args).items() if k not in {"command", "handler", "nproc"}}
        relaunch(args.nproc, "train", options, processes.threads(config.threads))

    def report(metrics: EpochMetrics) -> None:
        print(
            f"epoch {metrics.epoch:>3}/{config.epochs}  train loss {metrics.train_loss:.4f}  "
            f"val loss {metrics.val_loss:.4f}  val accuracy {metrics.val_accuracy:.4f}  "
            f"{metrics.seconds:.1f}s  {metrics.samples_per_second:,.0f} samples/s",
            flush=True,
        )

    store = _store(args)
    if world.is_main:
        check_push(args)
    result = train(
        config,
        store,
        out,
        progress=not args.no_progress,
        resume=args.resume,
        on_epoch=None if args.json else report,
        world=world,
    )
    if not world.is_main:
        return  # rank 0 writes the bundle and reports
    dataset = store.get(config.dataset, config.dataset_version)
    bundle = write_bundle(result, dataset, config, target)
    if args.json:
        metrics = json.loads((bundle / "metrics.json").read_text())
        pushed = push_from_args(args, bundle)
        print(json.dumps({"bundle": str(bundle), **metrics, **pushed}, indent=2))
        return
    stopped = f" (stopped early after {len(result.history)})" if result.stopped_early else ""
    print(f"best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}{stopped}")
    print(f"test accuracy {result.test_accuracy:.4f}")
    print(f"bundle {bundle}")
    push_from_args(args, bundle)


_TRAIN_OPTIONS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "width",
    "depth",
    "seed",
    "patience",
    "train_samples",
    "device",
    "threads",
)
