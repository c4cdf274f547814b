"""Training a zoo model on a stored dataset version: seeded, checkpointed every epoch,
stopped early on validation accuracy, and scored on the test split with the best state.

Each split is preprocessed once, up front, into tensors on the training device; an epoch is a
shuffled walk over the training indices (a seeded generator of its own), so a step does no
Python-side transforms. Augmentation (off by default) gives class probabilities, and the one
loss is cross entropy against them.

The checkpoint, `out_dir/.checkpoint.pt`, holds everything the next epoch depends on: the
model, the optimizer, the best state so far, the history and the random states. Resuming from
it gives the same result as a run that was never interrupted.

Under torchrun (`distributed.py`) every process walks the same shuffle and takes its part of
each global batch of `batch_size`; DistributedDataParallel averages the gradients. Batch
norm's statistics are rank 0's before each evaluation, evaluation adds up every rank's share
of the split, so each rank sees the same accuracy and takes the same early-stopping and
best-state decisions (none stops while another goes on). Rank 0 alone reports and
checkpoints, with every rank's random state.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from tqdm import tqdm

from kapi.core.errors import FailedPrecondition, InvalidArgument, NotFound
from kapi.trainer import models
from kapi.trainer.data.augment import AugmentConfig, Augmenter
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.distributed import SINGLE_PROCESS, World, joined

CHECKPOINT = ".checkpoint.pt"
EVAL_BATCH = 1024
# An epoch's augmenter is seeded apart from the others': seed * stride + epoch.
EPOCH_SEED_STRIDE = 65_537
# What may differ between a checkpoint's run and the run that resumes it.
RESUMABLE = frozenset({"epochs", "patience", "device", "threads"})

PositiveInt = Annotated[int, Field(ge=1)]
Multiplier = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    dataset_version: str | None = None  # a digest or its first hex digits; None: the latest
    model: str  # a zoo name: kapi.trainer.models.names()
    width: Multiplier = 1.0
    depth: Multiplier = 1.0
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1e-3  # AdamW
    weight_decay: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1e-4
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    patience: PositiveInt = 5  # epochs without a better val accuracy before stopping
    # A stratified, seeded subset of the training split (HPO trials train on one); None: all.
    train_samples: PositiveInt | None = None
    augment: AugmentConfig = AugmentConfig()
    device: str = "auto"  # cuda when there is one, else cpu; or a torch device name
    threads: PositiveInt | None = None  # torch's intra-op threads; None: every core

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto":
            torch.device(value)  # raises RuntimeError on a name torch does not know
        return value


class EpochMetrics(BaseModel):
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float
    samples_per_second: float


@dataclass
class Result:
    """The trained model, on the CPU with its best state, and how it got there."""

    model: nn.Module
    history: list[EpochMetrics]
    best_epoch: int
    best_val_accuracy: float
    test_accuracy: float
    stopped_early: bool
    input_shape: list[int]  # one sample's, without the batch dimension
    num_classes: int
    device: str


@dataclass
class _Splits:
    """Each split preprocessed, on the training device."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    num_classes: int


@dataclass
class _Run:
    """What every epoch works with."""

    config: TrainConfig
    model: nn.Module  # the plain module: evaluated, checkpointed, returned
    network: nn.Module  # what steps train: `model`, or it in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    splits: _Splits
    shuffle: torch.Generator  # the same on every rank
    world: World


def train(
    config: TrainConfig,
    store: DatasetStore,
    out_dir: Path,
    progress: bool = True,
    *,
    resume: bool = False,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    world: World | None = None,
) -> Result:
    """Train `config.model` on `config.dataset`; `resume` continues from out_dir's checkpoint.

    In a distributed run (`world`, by default torchrun's, of more than one process) every
    rank returns the same Result; only rank 0 shows progress, checkpoints and calls
    `on_epoch`."""
    world = world or World.from_environment()
    world.check_batch_size(config.batch_size)  # refused before anything starts
    dataset = store.get(config.dataset, config.dataset_version)
    device = world.device(resolve_device(config.device))
    with joined(world, device):
        run = _start(config, dataset, device, world)
        checkpoint = out_dir / CHECKPOINT
        state = _State(best_state=_copy_state(run.model))
        if resume:
            state = _restore(checkpoint, run, dataset)
        run.network = world.wrap(run.model, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        while state.epoch < config.epochs and not state.stalled(config.patience):
            state.epoch += 1
            metrics = _run_epoch(run, state.epoch, progress and world.is_main)
            state.record(metrics, run.model)
            random_states = world.gather(_rng_states(run.shuffle))
            if world.is_main:
                _save(checkpoint, run, dataset, state, random_states)
            if world.is_main and on_epoch is not None:
                on_epoch(metrics)
        model, splits = run.model, run.splits
        model.load_state_dict(state.best_state)
        _, test_accuracy = evaluate(model, splits.x["test"], splits.y["test"], world)
    return Result(
        model=model.cpu().eval(),
        history=state.history,
        best_epoch=state.best_epoch,
        best_val_accuracy=state.best_val_accuracy,
        test_accuracy=test_accuracy,
        stopped_early=state.epoch < config.epochs,
        input_shape=_input_shape(dataset),
        num_classes=splits.num_classes,
        device=str(device),
    )


def validate(config: TrainConfig, store: DatasetStore, world: World) -> None:
    """Refuse now what `train` in `world` would refuse as it starts (for a launcher: one
    error, not one from every process it would start)."""
    world.check_batch_size(config.batch_size)
    world.device(resolve_device(config.device))
    build_model(config, store.get(config.dataset, config.dataset_version))


def _start(config: TrainConfig, dataset: Dataset, device: torch.device, world: World) -> _Run:
    """The seeded model, the splits on `device`, the optimizer and the shuffle."""
    torch.set_num_threads(world.threads(config.threads))
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(config, dataset).to(device)
    world.reseed(config.seed)  # the same initial weights everywhere, but not the same dropout
    splits = _load_splits(dataset, device, config.train_samples, config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    return _Run(config, model, model, optimizer, splits, shuffle, world)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: TrainConfig, dataset: Dataset) -> nn.Module:
    """A fresh zoo model for the dataset's inputs and classes (InvalidArgument, listing the
    zoo, for a name it does not have)."""
    shape = _input_shape(dataset)
    if len(shape) != 3:
        raise InvalidArgument(
            f"dataset '{dataset.name}' holds rows of {shape[0]} features; the zoo's models "
            "take images"
        )
    # A model whose stem depends on the input's side (resnet18) takes its size.
    extra = {"input_size": max(shape[1:])} if "input_size" in models.options(config.model) else {}
    return models.build(
        config.model,
        in_channels=shape[0],
        num_classes=len(dataset.classes),
        width=config.width,
        depth=config.depth,
        **extra,
    )


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, world: World = SINGLE_PROCESS
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) in eval mode; (nan, nan) for an empty split. In a
    distributed run each rank scores its share and all get the sums."""
    if len(y) == 0:
        return float("nan"), float("nan")
    samples = len(y)
    x, y = world.share(x), world.share(y)
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, len(y), EVAL_BATCH):
            logits = model(x[start : start + EVAL_BATCH])
            labels = y[start : start + EVAL_BATCH]
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
    world.sum(loss, correct)
    return float(loss) / samples, int(correct) / samples


def _run_epoch(run: _Run, epoch: int, progress: bool) -> EpochMetrics:
    config, splits = run.config, run.splits
    seed = run.world.seed(config.seed * EPOCH_SEED_STRIDE + epoch)
    augmenter = Augmenter(config.augment, seed)
    started = time.perf_counter()
    bar = tqdm(
        total=-(-len(splits.y["train"]) // config.batch_size),
        desc=f"epoch {epoch}/{config.epochs}",
        disable=not progress or not sys.stderr.isatty(),
        leave=False,
    )
    with bar:
        train_loss = _train_epoch(run, augmenter, bar)
    run.world.align_buffers(run.model)
    val_loss, val_accuracy = evaluate(run.model, splits.x["val"], splits.y["val"], run.world)
    seconds = time.perf_counter() - started
    return EpochMetrics(
        epoch=epoch,
        train_loss=train_loss,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        seconds=seconds,
        samples_per_second=len(splits.y["train"]) / seconds,
    )


def _train_epoch(run: _Run, augmenter: Augmenter, bar: tqdm) -> float:
    """One walk over the shuffled training split; the mean training loss (over all ranks)."""
    run.network.train()
    x, y = run.splits.x["train"], run.splits.y["train"]
    order = torch.randperm(len(y), generator=run.shuffle).to(x.device)
    batch_size, optimizer = run.config.batch_size, run.optimizer
    total = torch.zeros((), device=x.device)
    seen = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, len(y), batch_size):
        batch = order[start : start + batch_size]
        smallest = len(batch) // run.world.size  # the smallest rank's part of it
        if smallest == 0 or (smallest == 1 and len(y) > 1):
            bar.update()
            continue  # a last batch of one: batch norm cannot train on it (the next epoch's
            # shuffle puts that sample elsewhere); every rank skips it, or DDP would hang
        chosen = run.world.share(batch)
        images, targets = augmenter(x[chosen], y[chosen], run.splits.num_classes)
        loss = nn.functional.cross_entropy(run.network(images), targets)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        total += loss.detach() * len(chosen)
        seen += len(chosen)
        bar.update()
    run.world.sum(total, seen)
    return float(total) / max(int(seen), 1)


def _load_splits(
    dataset: Dataset, device: torch.device, train_samples: int | None = None, seed: int = 0
) -> _Splits:
    x_all, y_all, split = dataset.arrays()
    if train_samples is not None:
        split = subset_train(split, y_all, train_samples, seed)
    preprocessing = dataset.preprocessing
    splits = _Splits({}, {}, len(dataset.classes))
    for which in ("train", "val", "test"):
        chosen = split == which
        splits.x[which] = torch.from_numpy(preprocessing.apply(x_all[chosen])).to(device)
        splits.y[which] = torch.from_numpy(y_all[chosen].astype(np.int64)).to(device)
    if len(splits.y["train"]) == 0 or len(splits.y["val"]) == 0:
        raise FailedPrecondition(
            f"dataset '{dataset.name}' needs train and val samples to train and stop early on"
        )
    return splits


def subset_train(
    split: np.ndarray[Any, Any], y: np.ndarray[Any, Any], samples: int, seed: int
) -> np.ndarray[Any, Any]:
    """`split` with all but `samples` training samples (stratified, seeded) marked unused."""
    train = np.flatnonzero(split == "train")
    if samples >= len(train):
        return split
    from sklearn.model_selection import train_test_split

    try:
        kept, _ = train_test_split(train, train_size=samples, random_state=seed, stratify=y[train])
    except ValueError as exc:  # fewer samples than classes
        raise InvalidArgument(f"train_samples {samples}: {exc}") from exc
    subset = split.copy()
    subset[train] = "unused"
    subset[np.asarray(kept)] = "train"
    return subset


def _input_shape(dataset: Dataset) -> list[int]:
    return dataset.preprocessing.input_shape(tuple(dataset.meta["sample_shape"]))


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@dataclass
class _State:
    """Where training stands after `epoch` epochs."""

    best_state: dict[str, torch.Tensor]
    epoch: int = 0
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    history: list[EpochMetrics] = field(default_factory=list)

    def stalled(self, patience: int) -> bool:
        return self.epoch - self.best_epoch >= patience

    def record(self, metrics: EpochMetrics, model: nn.Module) -> None:
        self.history.append(metrics)
        if metrics.val_accuracy > self.best_val_accuracy:
            self.best_val_accuracy = metrics.val_accuracy
            self.best_epoch = metrics.epoch
            self.best_state = _copy_state(model)


def _save(
    path: Path, run: _Run, dataset: Dataset, state: _State, random_states: list[dict[str, Any]]
) -> None:
    """Written beside and renamed into place: a cancelled save leaves the last one whole.
    `random_states` are every rank's, in rank order."""
    checkpoint = {
        "config": run.config.model_dump(mode="json"),
        "dataset_digest": dataset.digest,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy,
        "best_state": state.best_state,
        "history": [metrics.model_dump() for metrics in state.history],
        "rng": random_states[0],
        "rank_rngs": random_states[1:],  # ranks 1, 2, ... of a distributed run
    }
    temp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, temp)
    os.replace(temp, path)


def _restore(path: Path, run: _Run, dataset: Dataset) -> _State:
    """Every rank reads the checkpoint (rank 0 overwrites it only after an epoch, which
    every rank takes part in)."""
    config = run.config
    if not path.is_file():
        raise NotFound(f"there is no checkpoint to resume from at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in checkpoint["config"].items() if k not in RESUMABLE}
    wanted = {k: v for k, v in config.model_dump(mode="json").items() if k not in RESUMABLE}
    changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if changed or checkpoint["dataset_digest"] != dataset.digest:
        what = ", ".join(changed) if changed else "the dataset version"
        raise FailedPrecondition(
            f"the checkpoint at {path} is of another run ({what} differ); only "
            f"{sorted(RESUMABLE)} may change on resume"
        )
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    random_states = [checkpoint["rng"], *checkpoint.get("rank_rngs", [])]
    if run.world.rank < len(random_states):
        _set_rng_states(random_states[run.world.rank], run.shuffle)
    else:  # a rank the checkpoint's run did not have keeps its own stream (World.reseed)
        run.shuffle.set_state(random_states[0]["shuffle"])
    return _State(
        best_state=checkpoint["best_state"],
        epoch=checkpoint["epoch"],
        best_epoch=checkpoint["best_epoch"],
        best_val_accuracy=checkpoint["best_val_accuracy"],
        history=[EpochMetrics.model_validate(m) for m in checkpoint["history"]],
    )


def _rng_states(shuffle: torch.Generator) -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # legacy=True: the tuple, not the dict
    _, keys, position, has_gauss, gauss = numpy_state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": shuffle.get_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
    }


def _set_rng_states(states: dict[str, Any], shuffle: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    shuffle.set_state(states["shuffle"])
    keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, gauss))
