"""Pruning a model's PyTorch weights, before the optimizer exports it again:

    structured    a share of every layer's channels removed (torch-pruning, through its
                  dependency graph: residual adds, depthwise convolutions and channel gates
                  stay consistent). A dense, smaller model: faster on every runtime. It loses
                  accuracy, which `fine_tune` wins back.
    unstructured  the smallest weights of all convolutions and linear layers zeroed (a global
                  L1 threshold), the layers kept dense: the same shapes and the same work, so
                  no dense kernel runs faster; the file compresses better.
    2:4           two of every four weights zeroed along the input channels (NVIDIA's
                  semi-structured sparsity): only TensorRT on sparse tensor cores (Ampere and
                  later) runs it faster; no speed anywhere else.

Every function returns a pruned copy and leaves its argument as it was (a source's model is
pruned once per variant). `summarize(method, before, after)` says what a method did.

The 2:4 groups are those TensorRT and NVIDIA's ASP use: for a convolution's [out, in, kh, kw]
weight, four consecutive input channels at one output channel and kernel position; for a
linear layer's [out, in], four consecutive inputs. A layer whose input channels (per group)
are not a multiple of 4 is left dense: depthwise convolutions, a stem on 1 or 3 channels.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from kapi.core.errors import FailedPrecondition, InternalError, InvalidArgument
from kapi.trainer.data.augment import AugmentConfig, Augmenter
from kapi.trainer.data.store import Dataset
from kapi.trainer.training import EPOCH_SEED_STRIDE, EpochMetrics, evaluate, subset_train

log = logging.getLogger(__name__)

Method = Literal["structured", "unstructured", "2:4"]
METHODS: tuple[Method, ...] = ("structured", "unstructured", "2:4")
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers whose weights are pruned
GROUP = 4  # 2:4: a group of four weights keeps two
KEPT = 2
SPEED = {
    "structured": "fewer channels: faster on every runtime",
    "unstructured": "dense shapes unchanged: no faster on dense kernels, smaller compressed",
    "2:4": "faster only on TensorRT with sparse tensor cores (Ampere and later); "
    "no gain on CPU runtimes",
}
SKIPPED = {  # what the layers in a summary's `skipped` have in common
    "structured": "keep their output channels",
    "unstructured": "had no weight zeroed",
    "2:4": "stay dense (input channels not a multiple of 4)",
}


# --- structured -------------------------------------------------------------------------------


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    *,
    ignored: Sequence[nn.Module] | None = None,
) -> nn.Module:
    """A copy of `model`, in eval mode, with `ratio` of the output channels of every
    convolution and linear layer removed (the same share in each layer, the channels of
    smallest L2 norm across each dependency group), except in the last layer the forward
    pass runs (the classifier: the outputs stay) and in `ignored` (modules of `model`). The
    input's channels stay too. Weights in conv and linear layers shrink to about
    (1 - ratio)^2, a depthwise convolution's to (1 - ratio). `example_input` is one batch
    the model takes, to trace it by."""
    _check_ratio(ratio)
    if not isinstance(example_input, torch.Tensor):
        raise InvalidArgument(f"example_input must be a tensor, got {type(example_input).__name__}")
    memo: dict[int, object] = {}
    pruned = copy.deepcopy(model, memo).cpu().eval()
    example_input = example_input.detach().cpu()
    shape, head = _trace(pruned, example_input)
    kept = [head, *(_copy_of(module, model, memo) for module in ignored or ())]
    pruner = tp.pruner.BasePruner(  # 1.6's name; MetaPruner and MagnitudePruner are aliases
        pruned,
        example_input,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,  # uniform: each layer loses `ratio`, none is emptied
        ignored_layers=kept,
    )
    pruner.step()
    got, _ = _trace(pruned, example_input)
    if got != shape:
        raise InternalError(f"structured pruning changed the output from {shape} to {got}")
    _log(summarize("structured", model, pruned))
    return pruned


def _trace(model: nn.Module, example_input: torch.Tensor) -> tuple[tuple[int, ...], nn.Module]:
    """(the output's shape, the last conv or linear layer the forward pass runs)."""
    called: list[nn.Module] = []
    handles = [
        layer.register_forward_hook(lambda module, _args, _out: called.append(module))
        for _, layer in weighted_layers(model)
    ]
    try:
        with torch.no_grad():
            output = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise InvalidArgument("the model runs no convolution or linear layer to prune")
    if not isinstance(output, torch.Tensor):
        raise InvalidArgument(f"the model must return a tensor, not {type(output).__name__}")
    return tuple(output.shape), called[-1]


def _copy_of(module: nn.Module, model: nn.Module, memo: dict[int, object]) -> nn.Module:
    copied = memo.get(id(module))
    if not isinstance(copied, nn.Module) or not any(module is m for m in model.modules()):
        raise InvalidArgument(f"ignored {type(module).__name__} is not a module of the model")
    return copied


# --- fine-tuning ------------------------------------------------------------------------------


def fine_tune(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
    augment: AugmentConfig | None = None,
    train_samples: int | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> nn.Module:
    """A copy of `model` trained `epochs` more epochs on the training split, on the CPU (AdamW,
    the dataset's stored preprocessing, `augment` as the bundle's training config had it;
    none by default), in eval mode with the state of its best val accuracy: the model as it
    came counts as epoch 0, so fine-tuning never returns a worse one on val. The same seed
    gives the same weights; torch's global random state is left as it was. `train_samples`:
    the stratified, seeded subset of the training split the bundle was trained on."""
    _check_fine_tune(epochs, lr, batch_size, seed)
    tuned = copy.deepcopy(model).cpu()
    train, val = _splits(dataset, train_samples, seed)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout's and drop-path's draws
        shuffle = torch.Generator().manual_seed(seed)
        loop = _Loop(tuned, optimizer, train, val, batch_size, len(dataset.classes), shuffle)
        _, best_accuracy = evaluate(tuned, *val)
        best_epoch, best_state = 0, _copy_state(tuned)
        log.info("fine-tuning from val accuracy %.4f", best_accuracy)
        for epoch in range(1, epochs + 1):
            augmenter = Augmenter(augment or AugmentConfig(), seed * EPOCH_SEED_STRIDE + epoch)
            metrics = _epoch(loop, augmenter, epoch)
            log.info("fine-tuning epoch %d: val accuracy %.4f", epoch, metrics.val_accuracy)
            if metrics.val_accuracy > best_accuracy:
                best_epoch, best_accuracy = epoch, metrics.val_accuracy
                best_state = _copy_state(tuned)
            if on_epoch is not None:
                on_epoch(metrics)
    tuned.load_state_dict(best_state)
    log.info("fine-tuned: epoch %d of %d is the best (val %.4f)", best_epoch, epochs, best_accuracy)
    return tuned.eval()


def _check_fine_tune(epochs: int, lr: float, batch_size: int, seed: int) -> None:
    for name, value, low in (
        ("epochs", epochs, 0),
        ("batch_size", batch_size, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgument(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise InvalidArgument(f"lr must be a number > 0, got {lr!r}")


Split = tuple[torch.Tensor, torch.Tensor]  # preprocessed images, class ids


def _splits(dataset: Dataset, train_samples: int | None, seed: int) -> tuple[Split, Split]:
    """The train and val splits preprocessed as the bundle's model takes them, on the CPU."""
    x_all, y_all, split = dataset.arrays()
    if train_samples is not None:
        split = subset_train(split, y_all, train_samples, seed)
    preprocessing = dataset.preprocessing
    splits = []
    for which in ("train", "val"):
        chosen = split == which
        if not chosen.any():
            raise FailedPrecondition(
                f"dataset '{dataset.name}' needs train and val samples to fine-tune on"
            )
        x = torch.from_numpy(preprocessing.apply(x_all[chosen]))
        splits.append((x, torch.from_numpy(y_all[chosen].astype(np.int64))))
    return splits[0], splits[1]


@dataclass
class _Loop:
    """What every fine-tuning epoch works with."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: Split
    val: Split
    batch_size: int
    num_classes: int
    shuffle: torch.Generator


def _epoch(loop: _Loop, augmenter: Augmenter, epoch: int) -> EpochMetrics:
    """One shuffled walk over the training split, then the val split's loss and accuracy."""
    started = time.perf_counter()
    loop.model.train()
    x, y = loop.train
    order = torch.randperm(len(y), generator=loop.shuffle)
    total, seen = 0.0, 0
    for start in range(0, len(y), loop.batch_size):
        batch = order[start : start + loop.batch_size]
        if len(batch) == 1 and len(y) > 1:
            continue  # batch norm cannot train on one sample; the next shuffle moves it
        images, targets = augmenter(x[batch], y[batch], loop.num_classes)
        loss = nn.functional.cross_entropy(loop.model(images), targets)
        loop.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        loop.optimizer.step()
        total, seen = total + float(loss.detach()) * len(batch), seen + len(batch)
    val_loss, val_accuracy = evaluate(loop.model, *loop.val)
    seconds = time.perf_counter() - started
    return EpochMetrics(
        epoch=epoch,
        train_loss=total / max(seen, 1),
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        seconds=seconds,
        samples_per_second=len(y) / seconds,
    )


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# --- unstructured -----------------------------------------------------------------------------


def prune_unstructured(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of `model` with the `ratio` of smallest-magnitude weights of all its convolution
    and linear layers together set to zero (one global L1 threshold; biases kept), made
    permanent: plain dense weights holding zeros, no masks or hooks left."""
    _check_ratio(ratio)
    pruned = copy.deepcopy(model)
    targets = [(layer, "weight") for _, layer in weighted_layers(pruned)]
    if not targets:
        raise InvalidArgument("the model has no convolution or linear layer to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ratio)
    for layer, name in targets:
        prune.remove(layer, name)  # type: ignore[no-untyped-call]
    _log(summarize("unstructured", model, pruned))
    return pruned


# --- 2:4 -----------------------------------------------------------------------------------------


def prune_2to4(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every eligible convolution and linear layer keeps the two
    largest-magnitude weights of each group of four along its input channels (see the module
    doc); the others, `skipped_2to4`, stay dense."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for _, weight in weights(pruned):
            if fits_2to4(weight):
                weight.mul_(mask_2to4(weight))
    _log(summarize("2:4", model, pruned))
    return pruned


def fits_2to4(weight: torch.Tensor) -> bool:
    """Whether a conv or linear weight can be 2:4 sparse: its input dimension (dim 1, the
    channels per group) is a multiple of 4."""
    return weight.dim() >= 2 and weight.shape[1] % GROUP == 0


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """A boolean mask of `weight`'s shape keeping the two largest magnitudes of each group of
    four consecutive input channels (InvalidArgument where the weight does not fit)."""
    grouped = _groups(weight)
    keep = grouped.abs().topk(KEPT, dim=1).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, keep, True)
    return _ungroup(mask, weight.shape)


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of four consecutive input channels of `weight` (at each output
    channel and kernel position) holds at most two nonzeros; False for a weight that does
    not fit 2:4 at all."""
    if not fits_2to4(weight):
        return False
    return bool((torch.count_nonzero(_groups(weight), dim=1) <= KEPT).all())


def skipped_2to4(model: nn.Module) -> list[str]:
    """The conv and linear layers (by name) that 2:4 leaves dense: input channels per group
    not a multiple of 4."""
    return [name for name, weight in weights(model) if not fits_2to4(weight)]


def _groups(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, *kernel] as rows of four consecutive input channels: [out * kernel * in/4, 4]."""
    if not fits_2to4(weight):
        raise InvalidArgument(
            f"a weight of shape {list(weight.shape)} does not fit 2:4: its input dimension is "
            "not a multiple of 4"
        )
    return weight.detach().movedim(1, -1).reshape(-1, GROUP)


def _ungroup(grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    moved = (shape[0], *shape[2:], shape[1])
    return grouped.reshape(moved).movedim(-1, 1)


# --- measures and summaries -------------------------------------------------------------------


def weighted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's convolutions and linear layers, by name: what the methods prune."""
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            yield name, module


def weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of the model's convolutions and linear layers, by their layer's name."""
    for name, layer in weighted_layers(model):
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        yield name, weight


def sparsity(model: nn.Module) -> float:
    """The share of zeros among the weights of the model's conv and linear layers."""
    zeros, total = 0, 0
    for _, weight in weights(model):
        zeros += _zeros(weight)
        total += weight.numel()
    return zeros / total if total else 0.0


def count_parameters(model: nn.Module) -> int:
    """Every parameter of the model (batch norms' too), each shared tensor once."""
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass(frozen=True)
class PruningSummary:
    """What a method did to a model."""

    method: Method
    parameters_before: int
    parameters_after: int
    sparsity_before: float  # zeros among the conv and linear weights
    sparsity_after: float
    layers: int  # conv and linear layers
    # Conv and linear layers the method left as they were: structured, those whose outputs
    # were kept (the classifier); unstructured, those with no weight zeroed; 2:4, those whose
    # input channels are not a multiple of 4.
    skipped: tuple[str, ...]
    speed: str  # where the result runs faster

    @property
    def parameter_ratio(self) -> float:
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    def note(self) -> str:
        """One line for a variants table's notes."""
        skipped = ""
        if self.skipped:
            skipped = f"; {len(self.skipped)} of {self.layers} layers {SKIPPED[self.method]}"
        return (
            f"{self.method} pruning: {self.parameters_before:,} -> {self.parameters_after:,} "
            f"parameters ({self.parameter_ratio:.2f}x), weight sparsity "
            f"{self.sparsity_before:.2f} -> {self.sparsity_after:.2f}{skipped}; {self.speed}"
        )


def summarize(method: Method, before: nn.Module, after: nn.Module) -> PruningSummary:
    """What `method` did, from the model before and after it (by layer name)."""
    if method not in METHODS:
        raise InvalidArgument(f"unknown pruning method {method!r}; choose from {list(METHODS)}")
    old, new = dict(weights(before)), dict(weights(after))
    skipped: list[str]
    if method == "structured":
        skipped = [n for n, w in new.items() if n in old and w.shape[0] == old[n].shape[0]]
    elif method == "unstructured":
        skipped = [n for n, w in new.items() if n in old and _zeros(w) == _zeros(old[n])]
    else:
        skipped = [n for n, w in new.items() if not is_2to4(w)]
    return PruningSummary(
        method=method,
        parameters_before=count_parameters(before),
        parameters_after=count_parameters(after),
        sparsity_before=sparsity(before),
        sparsity_after=sparsity(after),
        layers=len(new),
        skipped=tuple(skipped),
        speed=SPEED[method],
    )


def _zeros(weight: torch.Tensor) -> int:
    return weight.numel() - int(torch.count_nonzero(weight))


def _log(summary: PruningSummary) -> None:
    log.info("%s", summary.note())
    if summary.skipped:
        log.info("%s: %s %s", summary.method, ", ".join(summary.skipped), SKIPPED[summary.method])


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise InvalidArgument(
            f"the pruning ratio is the share of channels or weights removed and must lie "
            f"strictly between 0 and 1, got {ratio!r}"
        )
