"""Benchmark kapi's training loop against a plain PyTorch loop in one run: the same model,
the same preprocessed data, the same optimizer, batches and epochs, rounds interleaved.

The data: a seeded, stratified subset of the dataset (Fashion-MNIST full size from Debian's
dataset-fashion-mnist, or scikit-learn's digits), ingested into a DatasetStore as its own
version, split 80 / 10 / 10 by the ingest: about SAMPLES training images and an eighth as
many for validation. Every contender trains on exactly that version's train split and validates on
its val split.

The contenders, each building its model with kapi's `build_model` after
`torch.manual_seed(seed)` (the same initial weights), AdamW with the same lr and weight decay,
the same torch threads:

- kapi: `kapi.trainer.training.train(config, store, out_dir, progress=True, on_epoch=...)`
  as a user runs it: its tqdm bar drawn (tqdm draws only when stderr is a terminal, so
  sys.stderr is a pseudo-terminal for the call, 100 columns, raw, drained by a thread that
  counts what the bar wrote), a checkpoint saved every epoch, the per-epoch callback.
- kapi-quiet (not run by default): the same with progress=False, to price the bar.
- plain: the textbook loop over the same preprocessed tensors, a shuffled index per epoch
  (the same generator seed as kapi's, so the same batches), `cross_entropy`, `zero_grad`,
  `backward`, `step`, `loss.item()` per batch, then a validation pass (loss and accuracy,
  batches of kapi's EVAL_BATCH). No checkpoint, no bar. The goal is held against this one.
- plain-dataloader: the same loop fed by `DataLoader(TensorDataset(x, y), shuffle=True)`
  (no workers), which is what most plain code writes: it indexes one sample at a time and
  collates them.

What is timed, the same way on every side: the wall time (perf_counter) and the process's
CPU time (utime + stime of every thread, /proc/self/stat) from the end of epoch 1 to the end
of the last epoch. An epoch ends after its validation pass: on kapi's side when `on_epoch`
is called, which is after the epoch's checkpoint is written. Epoch 1 is the warm-up; the
setup (loading and preprocessing the data, building the model) and kapi's final test pass
are outside the window. samples/s = training samples x measured epochs / window seconds
(validation included in the time, not in the count, as in kapi's EpochMetrics).

Each round runs every contender once, for each model, alternating the order; the ratio
kapi / plain is taken within each round, and its median round held to the goal (>= 0.9).
Prints a table and writes bench/results/trainer-<time>.json.

    .venv/bin/python bench/trainer.py [--quick] [--dataset fashion-mnist|digits]
        [--models small_cnn mobilenet_v2] [--rounds 5] [--epochs 3] [--samples 4096]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import signal
import statistics
import struct
import sys
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from kapi.trainer.data.sources import Samples, open_source
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.training import (
    EVAL_BATCH,
    EpochMetrics,
    TrainConfig,
    build_model,
    resolve_device,
    train,
)
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GOAL = 0.9
GOAL_BASELINE = "plain"
DATASETS = {"fashion-mnist": "fashion-mnist", "digits": "sklearn-digits"}
WIDTHS = {"small_cnn": 1.0, "mobilenet_v2": 0.5}  # the models measured and their widths
TRAIN_SHARE = 0.8  # the ingest's split: 10 % val, 10 % test
TERMINAL_COLUMNS = 100
FULL = {"rounds": 5, "epochs": 3, "samples": 4096, "models": list(WIDTHS)}
QUICK = {"rounds": 2, "epochs": 2, "samples": 1024, "models": ["small_cnn"]}

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Job:
    """What every contender of one model trains on."""

    config: TrainConfig
    store: DatasetStore
    dataset: Dataset
    device: torch.device
    train: tuple[torch.Tensor, torch.Tensor]  # preprocessed, on the CPU
    val: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Mark:
    """The end of one epoch (after its validation pass)."""

    wall_s: float
    cpu_s: float
    train_loss: float
    val_accuracy: float


@dataclass
class Run:
    """One contender's training run in one round."""

    model: str
    contender: str
    round: int
    train_samples: int
    marks: list[Mark] = field(default_factory=list)
    terminal_bytes: int = 0  # what the bar wrote to the pseudo-terminal
    terminal_redraws: int = 0  # carriage returns in it: about one per redraw

    @property
    def measured_epochs(self) -> int:
        return len(self.marks) - 1

    @property
    def samples_per_second(self) -> float:
        window = self.marks[-1].wall_s - self.marks[0].wall_s
        return self.train_samples * self.measured_epochs / window

    @property
    def cpu_s_per_1000(self) -> float:
        cpu = self.marks[-1].cpu_s - self.marks[0].cpu_s
        return cpu / (self.train_samples * self.measured_epochs) * 1000


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2: the first one is the warm-up")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds: stderr and the files restored
    started, clock, load_before = datetime.now(), time.perf_counter(), _loadavg()
    with tempfile.TemporaryDirectory(prefix="kapi-bench-trainer-", dir=args.tmp_dir) as tmp:
        store = DatasetStore(args.root or Path(tmp) / "datasets")
        dataset = _ingest(store, args.dataset, args.samples, args.seed)
        runs = _measure(args, store, dataset, Path(tmp))
    elapsed = time.perf_counter() - clock
    rows = _summary(runs)
    print(f"\n{_table(rows)}\n")
    same_work = _same_work(runs)
    for model, difference in same_work.items():
        print(f"{model}: epoch-1 training loss, kapi against plain: {difference:.1e} apart")
    path = RESULTS / f"trainer-{started:%Y%m%d-%H%M%S}.json"
    meta = _meta(started, elapsed, args, dataset, load_before) | {"same_work": same_work}
    _write_json(path, meta, rows, runs)
    print(f"{elapsed:.0f} s in all; results in {path.relative_to(REPO)}")
    return 0


# the data


def _ingest(store: DatasetStore, name: str, samples: int, seed: int) -> Dataset:
    """A stratified subset of about samples / TRAIN_SHARE images, stored as a version of its
    own (an ingest of the same subset again finds it there)."""
    source = open_source(DATASETS[name]).load()
    total = round(samples / TRAIN_SHARE)
    chosen = np.arange(len(source.y))
    if total < len(chosen):
        from sklearn.model_selection import train_test_split

        chosen, _ = train_test_split(chosen, train_size=total, random_state=seed, stratify=source.y)
        chosen = np.sort(chosen)
    subset = Samples(
        source.x[chosen],
        source.y[chosen],
        source.classes,
        description=f"{len(chosen)} of {source.description}, for bench/trainer.py",
    )
    print(f"ingesting {len(chosen)} images of {name} ...", flush=True)
    dataset, _ = store.ingest(f"bench-{name}-{len(chosen)}", subset, seed=seed)
    return dataset


def _tensors(dataset: Dataset, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split preprocessed as kapi preprocesses it, on the CPU."""
    x, y = dataset.split(which)
    return torch.from_numpy(dataset.preprocessing.apply(x)), torch.from_numpy(y)


def _config(args: argparse.Namespace, dataset: Dataset, model: str) -> TrainConfig:
    return TrainConfig(
        dataset=dataset.name,
        dataset_version=dataset.digest,
        model=model,
        width=WIDTHS.get(model, 1.0),
        epochs=args.epochs,
        patience=args.epochs,  # no early stop: every contender runs every epoch
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )


# the rounds


def _measure(
    args: argparse.Namespace, store: DatasetStore, dataset: Dataset, tmp: Path
) -> list[Run]:
    data = {which: _tensors(dataset, which) for which in ("train", "val")}
    device = resolve_device(args.device)
    jobs = [
        Job(_config(args, dataset, model), store, dataset, device, data["train"], data["val"])
        for model in args.models
    ]
    samples = len(data["train"][1])
    print(
        f"{samples} training and {len(data['val'][1])} validation samples, {device}, "
        f"{args.threads} torch threads",
        flush=True,
    )
    runs: list[Run] = []
    for index in range(args.rounds):
        print(f"round {index + 1} of {args.rounds}", flush=True)
        order = args.contenders if index % 2 == 0 else args.contenders[::-1]
        for job in jobs:
            for contender in order:
                run = Run(job.config.model, contender, index + 1, samples)
                CONTENDERS[contender](job, run, tmp)
                runs.append(run)
                print(f"  {_run_line(run)}", flush=True)
    return runs


def _run_line(run: Run) -> str:
    bar = f"  bar {run.terminal_bytes / 1000:.1f} kB" if run.terminal_bytes else ""
    return (
        f"{run.model:<13} {run.contender:<17} {run.samples_per_second:8.1f} samples/s  "
        f"{run.cpu_s_per_1000:6.3f} CPU s/1000  epoch-1 loss {run.marks[0].train_loss:.5f}{bar}"
    )


def _mark(device: torch.device, train_loss: float, val_accuracy: float) -> Mark:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Mark(time.perf_counter(), _cpu_seconds(), train_loss, val_accuracy)


def _cpu_seconds() -> float:
    """This process's user + system CPU time, every thread's, from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# kapi


def _kapi(job: Job, run: Run, tmp: Path, *, progress: bool) -> None:
    def on_epoch(metrics: EpochMetrics) -> None:
        run.marks.append(_mark(job.device, metrics.train_loss, metrics.val_accuracy))

    with tempfile.TemporaryDirectory(prefix="run-", dir=tmp) as out:
        terminal = _Terminal() if progress else contextlib.nullcontext(None)
        with terminal as drain:
            train(job.config, job.store, Path(out), progress=progress, on_epoch=on_epoch)
        if drain is not None:
            run.terminal_bytes, run.terminal_redraws = drain.bytes, drain.redraws


class _Drain(threading.Thread):
    """Reads the terminal's other end, as a terminal would, and counts what came."""

    def __init__(self, master: int) -> None:
        super().__init__(name="terminal-drain", daemon=True)
        self.master = master
        self.bytes = self.redraws = 0
        self.tail = b""

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the writing end is closed
                return
            if not chunk:
                return
            self.bytes += len(chunk)
            self.redraws += chunk.count(b"\r")
            self.tail = (self.tail + chunk)[-2000:]


class _Terminal:
    """sys.stderr on a pseudo-terminal for the block, so that tqdm draws its bar."""

    def __enter__(self) -> _Drain:
        self.master, slave = os.openpty()
        tty.setraw(slave)  # the bytes arrive as written (no \n -> \r\n)
        size = struct.pack("HHHH", 24, TERMINAL_COLUMNS, 0, 0)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
        self.stream = open(slave, "w", encoding="utf-8")  # closed in __exit__
        self.drain = _Drain(self.master)
        self.drain.start()
        self.saved, sys.stderr = sys.stderr, self.stream
        return self.drain

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        sys.stderr = self.saved
        self.stream.close()
        self.drain.join()
        os.close(self.master)
        if kind is not None and self.drain.tail:  # warnings went to the terminal: show them
            tail = self.drain.tail.decode(errors="replace")
            print(f"--- the terminal's last output:\n{tail}", file=sys.stderr)


# plain PyTorch


def _plain(job: Job, run: Run, tmp: Path, *, loader: Callable[..., Batches]) -> None:
    """The textbook loop, fed by `loader(x, y, batch_size, shuffle)`; no checkpoint (`tmp`
    unused)."""
    config = job.config
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    model = build_model(config, job.dataset).to(job.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    (x, y), (x_val, y_val) = _on(job.train, job.device), _on(job.val, job.device)
    for _ in range(config.epochs):
        model.train()
        running = 0.0
        for images, labels in loader(x, y, config.batch_size, shuffle):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            running += loss.item() * len(labels)
        accuracy = _validate(model, loader(x_val, y_val, EVAL_BATCH, None))
        run.marks.append(_mark(job.device, running / len(y), accuracy))


def _on(
    tensors: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = tensors
    return x.to(device), y.to(device)


def _validate(model: nn.Module, batches: Batches) -> float:
    """The accuracy over the validation split; its loss is computed too, as kapi's is."""
    model.eval()
    loss = correct = seen = 0.0
    with torch.no_grad():
        for images, labels in batches:
            logits = model(images)
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return correct / seen


def _indexed(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: torch.Generator | None
) -> Batches:
    """Batches picked by a shuffled index (kapi's way, with its generator: the same
    batches); without a generator, slices in order (validation, as kapi's evaluate)."""
    if shuffle is None:
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    order = torch.randperm(len(y), generator=shuffle).to(x.device)
    for start in range(0, len(y), batch_size):
        chosen = order[start : start + batch_size]
        if len(chosen) == 1 and len(y) > 1:
            continue  # as kapi: batch norm cannot train on one sample
        yield x[chosen], y[chosen]


def _dataloader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: torch.Generator | None
) -> Batches:
    """A DataLoader over a TensorDataset, shuffled with the same seed (the loader draws a
    base seed from the generator first, so the batches are another shuffle)."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(
        TensorDataset(x.cpu(), y.cpu()),
        batch_size=batch_size,
        shuffle=shuffle is not None,
        generator=shuffle,
        drop_last=shuffle is not None and len(y) % batch_size == 1,  # as kapi skips it
    )
    for images, labels in loader:
        yield images.to(x.device), labels.to(x.device)


CONTENDERS: dict[str, Callable[[Job, Run, Path], None]] = {
    "kapi": partial(_kapi, progress=True),
    "kapi-quiet": partial(_kapi, progress=False),
    "plain": partial(_plain, loader=_indexed),
    "plain-dataloader": partial(_plain, loader=_dataloader),
}


# the report


def _summary(runs: list[Run]) -> list[dict[str, Any]]:
    """Per model, one row for each kapi contender against each plain one: the ratio of their
    samples/s, taken within each round."""
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:  # in round order
        grouped.setdefault((run.model, run.contender), []).append(run)
    rows = []
    for (model, ours), mine in grouped.items():
        for (peer_model, theirs), peers in grouped.items():
            if peer_model == model and _is_kapi(ours) and not _is_kapi(theirs):
                rows.append(_row(model, ours, mine, theirs, peers))
    return rows


def _is_kapi(contender: str) -> bool:
    return contender.startswith("kapi")


def _row(model: str, ours: str, mine: list[Run], theirs: str, peers: list[Run]) -> dict[str, Any]:
    pairs = zip(mine, peers, strict=True)
    ratios = [kapi.samples_per_second / peer.samples_per_second for kapi, peer in pairs]
    ratio = statistics.median(ratios)
    held = (ours, theirs) == ("kapi", GOAL_BASELINE)
    return {
        "model": model,
        "kapi": ours,
        "baseline": theirs,
        "kapi_samples_per_second": statistics.median(r.samples_per_second for r in mine),
        "baseline_samples_per_second": statistics.median(r.samples_per_second for r in peers),
        "ratio": ratio,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_rounds": ratios,
        "kapi_cpu_s_per_1000": statistics.median(r.cpu_s_per_1000 for r in mine),
        "baseline_cpu_s_per_1000": statistics.median(r.cpu_s_per_1000 for r in peers),
        "goal": f">= {GOAL}" if held else "-",
        "met": ratio >= GOAL if held else None,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'model':<13} {'kapi':<10} {'baseline':<17} {'kapi/s':>8} {'base/s':>8} "
        f"{'ratio':>6} {'min-max':>11} {'kapi CPU':>9} {'base CPU':>9}  {'goal':<7} met"
    )
    lines = [header, f"{'':<59}samples/s{'':<20}s / 1000 samples"]
    for row in rows:
        met = {None: "", True: "yes", False: "NO"}[row["met"]]
        spread = f"{row['ratio_min']:.3f}-{row['ratio_max']:.3f}"
        lines.append(
            f"{row['model']:<13} {row['kapi']:<10} {row['baseline']:<17} "
            f"{row['kapi_samples_per_second']:8.1f} {row['baseline_samples_per_second']:8.1f} "
            f"{row['ratio']:6.3f} {spread:>11} {row['kapi_cpu_s_per_1000']:9.3f} "
            f"{row['baseline_cpu_s_per_1000']:9.3f}  {row['goal']:<7} {met}"
        )
    return "\n".join(lines)


def _same_work(runs: list[Run]) -> dict[str, float]:
    """Per model, the largest relative difference between the first epoch's training loss of
    a kapi run and of a plain run of the same round: the same weights and batches give the
    same loss, to float rounding (kapi's loss is against one-hot probabilities)."""
    worst: dict[str, float] = {}
    for kapi in (run for run in runs if run.contender == "kapi"):
        for peer in runs:
            if (peer.model, peer.round, peer.contender) == (kapi.model, kapi.round, "plain"):
                ours, theirs = kapi.marks[0].train_loss, peer.marks[0].train_loss
                difference = abs(ours - theirs) / abs(theirs)
                worst[kapi.model] = max(worst.get(kapi.model, 0.0), difference)
    return worst


def _write_json(
    path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], runs: list[Run]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    derived = ("measured_epochs", "samples_per_second", "cpu_s_per_1000")
    body = {
        "meta": meta,
        "figures": rows,
        "runs": [asdict(run) | {name: getattr(run, name) for name in derived} for run in runs],
    }
    path.write_text(json.dumps(body, indent=2) + "\n")


def _meta(
    started: datetime,
    elapsed: float,
    args: argparse.Namespace,
    dataset: Dataset,
    load_before: list[float],
) -> dict[str, Any]:
    packages = ["kapi", "torch", "numpy", "tqdm", "kornia"]
    counts = {which: sum(dataset.meta["counts"][which].values()) for which in ("train", "val")}
    return {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
        },
        "versions": {name: version(name) for name in packages},
        "dataset": {"name": dataset.name, "digest": dataset.digest, "samples": counts},
        "plan": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
        "timed": "wall and process CPU time from the end of epoch 1 to the end of the last "
        "epoch, each epoch's validation pass included (and kapi's checkpoint and bar)",
    }


def _loadavg() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = ", ".join(f"{key} {value}" for key, value in QUICK.items())
    full = ", ".join(f"{key} {value}" for key, value in FULL.items())
    parser.add_argument("--quick", action="store_true", help=f"a short run: {quick}")
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--models", nargs="+", help=f"zoo models (widths: {WIDTHS})")
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=["kapi", "plain", "plain-dataloader"],
    )
    parser.add_argument("--rounds", type=_positive, help="rounds of every contender")
    parser.add_argument("--epochs", type=_positive, help="epochs per run, the first unmeasured")
    parser.add_argument("--samples", type=_positive, help="about this many training samples")
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=_positive,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads, both sides (default: every core this process may use)",
    )
    parser.add_argument("--device", default="auto", help="as kapi's: auto, cpu, cuda, ...")
    parser.add_argument("--root", type=Path, help="a DatasetStore to keep the data in")
    parser.add_argument("--tmp-dir", type=Path, help="for the data and kapi's checkpoints")
    parser.epilog = f"Without --quick: {full}."
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


if __name__ == "__main__":
    sys.exit(main())
