"""Pruning: structured pruning leaves every zoo model dense, smaller and exportable with the
same outputs under ONNX Runtime; fine-tuning wins back what it cost on scikit-learn's digits;
unstructured pruning zeroes weights without changing a shape; 2:4 holds wherever a layer
fits it and names the layers it left alone; bad ratios are refused."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from kapi.core.errors import InvalidArgument
from kapi.optimizer import pruning
from kapi.trainer import models
from kapi.trainer.bundle import export_onnx
from kapi.trainer.data.sources import open_source
from kapi.trainer.data.store import Dataset, DatasetStore
from kapi.trainer.training import EpochMetrics, Result, TrainConfig, evaluate, train
from torch import nn

RATIO = 0.5
# Small enough to stay fast, deep enough to have every block the zoo has.
ZOO = {
    "small_cnn": ({"width": 0.5}, 16),
    "mobilenet_v2": ({"width": 0.25}, 32),
    "efficientnet_b0": ({"width": 0.25, "depth": 0.34}, 32),
    "resnet18": ({"width": 0.25, "input_size": 32}, 32),
}


def _conv_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def _calibrated(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """`model` in eval mode with batch-norm statistics from `sample`: at initialization they
    are (0, 1), which shrinks deep outputs towards zero and any comparison to noise."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: the one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(sample)
    return model.eval()


def _zoo_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    arguments, side = ZOO[name]
    torch.manual_seed(0)
    model = models.build(name, in_channels=3, num_classes=10, **arguments)
    sample = torch.randn(8, 3, side, side)
    return _calibrated(model, sample), sample


def test_every_zoo_model_is_covered() -> None:
    assert sorted(ZOO) == models.names()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_structured_pruning_gives_a_smaller_dense_model_that_exports(
    name: str, tmp_path: Path
) -> None:
    model, sample = _zoo_model(name)
    before = copy.deepcopy(model.state_dict())
    pruned = pruning.prune_structured(model, sample[:1], RATIO)
    assert not pruned.training
    with torch.no_grad():
        assert pruned(sample).shape == model(sample).shape == (8, 10)
    assert _conv_weights(pruned) <= 0.35 * _conv_weights(model)  # ~(1 - ratio)^2 inside
    layers = dict(pruning.weighted_layers(model))
    for layer_name, layer in pruning.weighted_layers(pruned):
        if layer_name != "classifier.3":
            out = layers[layer_name].weight.shape[0]
            assert layer.weight.shape[0] <= math.ceil(out * (1 - RATIO)), layer_name
    first = next(layer for _, layer in pruning.weighted_layers(pruned))
    assert first.weight.shape[1] == 3  # the input's channels stay
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    path = tmp_path / "pruned.onnx"
    export_onnx(pruned, [3, sample.shape[-1], sample.shape[-1]], path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": sample.numpy()})
    with torch.no_grad():
        expected = pruned(sample).numpy()
    assert expected.std() > 1e-3  # a comparison of real outputs, not of noise
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_structured_pruning_keeps_the_layers_it_is_told_to(tmp_path: Path) -> None:
    model, sample = _zoo_model("small_cnn")
    first = model.features[0][0]
    pruned = pruning.prune_structured(model, sample[:1], RATIO, ignored=[first])
    assert pruned.features[0][0].out_channels == first.out_channels
    summary = pruning.summarize("structured", model, pruned)
    assert summary.skipped == ("features.0.0", "classifier.3")  # the classifier: always
    assert summary.parameters_after < summary.parameters_before
    with pytest.raises(InvalidArgument, match="not a module of the model"):
        pruning.prune_structured(model, sample[:1], RATIO, ignored=[nn.Linear(2, 2)])


# --- on a trained model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Dataset]:
    store = DatasetStore(tmp_path_factory.mktemp("data"))
    store.ingest("digits", open_source("sklearn-digits").load())
    config = TrainConfig(dataset="digits", model="small_cnn", width=0.5, epochs=8, device="cpu")
    result = train(config, store, tmp_path_factory.mktemp("run"), progress=False)
    return result, store.get("digits")


def _test_accuracy(model: nn.Module, dataset: Dataset) -> float:
    x, y = dataset.split("test")
    images = torch.from_numpy(dataset.preprocessing.apply(x))
    return evaluate(model, images, torch.from_numpy(y))[1]


def _example(dataset: Dataset) -> torch.Tensor:
    x, _ = dataset.split("test")
    return torch.from_numpy(dataset.preprocessing.apply(x[:1]))


def test_fine_tuning_wins_back_what_structured_pruning_cost(
    digits: tuple[Result, Dataset],
) -> None:
    result, dataset = digits
    dense = _test_accuracy(result.model, dataset)
    assert dense >= 0.95
    pruned = pruning.prune_structured(result.model, _example(dataset), RATIO)
    assert _test_accuracy(pruned, dataset) < dense - 0.2  # half the channels gone hurts

    epochs: list[EpochMetrics] = []
    tuned = pruning.fine_tune(pruned, dataset, epochs=3, seed=0, on_epoch=epochs.append)
    assert [m.epoch for m in epochs] == [1, 2, 3]
    assert not tuned.training
    assert _test_accuracy(tuned, dataset) >= dense - 0.02
    assert pruning.count_parameters(tuned) == pruning.count_parameters(pruned)
    assert _test_accuracy(pruned, dataset) < dense - 0.2  # fine-tuned a copy


def test_fine_tuning_is_seeded_and_leaves_the_global_random_state(
    digits: tuple[Result, Dataset],
) -> None:
    result, dataset = digits
    pruned = pruning.prune_structured(result.model, _example(dataset), RATIO)
    state = torch.get_rng_state()
    first, second, other = (  # one epoch beats the pruned model's val accuracy: it is kept
        pruning.fine_tune(pruned, dataset, epochs=1, seed=seed).state_dict() for seed in (0, 0, 1)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    with pytest.raises(InvalidArgument, match="epochs must be an integer >= 0"):
        pruning.fine_tune(result.model, dataset, epochs=-1)
    with pytest.raises(InvalidArgument, match="lr must be a number > 0"):
        pruning.fine_tune(result.model, dataset, lr=0.0)


def test_unstructured_pruning_zeroes_weights_but_keeps_every_shape(
    digits: tuple[Result, Dataset],
) -> None:
    result, dataset = digits
    model = result.model
    pruned = pruning.prune_unstructured(model, RATIO)
    assert pruning.sparsity(pruned) == pytest.approx(RATIO, abs=0.01)
    assert pruning.sparsity(model) == 0.0  # the source keeps its weights
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    assert {key: value.shape for key, value in pruned.state_dict().items()} == shapes  # dense
    assert not any(module._forward_pre_hooks for module in pruned.modules())  # made permanent
    assert _test_accuracy(pruned, dataset) >= _test_accuracy(model, dataset) - 0.1
    summary = pruning.summarize("unstructured", model, pruned)
    assert summary.parameters_after == summary.parameters_before
    assert "no faster on dense kernels" in summary.note()


def test_2to4_holds_on_every_layer_that_fits_and_names_the_rest() -> None:
    model, sample = _zoo_model("mobilenet_v2")  # depthwise convolutions, a 3-channel stem
    pruned = pruning.prune_2to4(model)
    skipped = pruning.skipped_2to4(pruned)
    assert "features.0.0" in skipped  # the stem: 3 input channels
    depthwise = [n for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise
    assert set(depthwise) <= set(skipped)
    for name, weight in pruning.weights(pruned):
        if name in skipped:
            assert not pruning.is_2to4(weight)
            assert torch.equal(weight, dict(pruning.weights(model))[name])  # left dense
        else:
            assert pruning.is_2to4(weight), name
            assert int(torch.count_nonzero(weight)) <= weight.numel() // 2
    summary = pruning.summarize("2:4", model, pruned)
    assert summary.skipped == tuple(skipped)
    assert "TensorRT" in summary.note()
    with torch.no_grad():
        assert pruned(sample).shape == (8, 10)


def test_2to4_groups_run_along_the_input_channels() -> None:
    # [out 1, in 4, kh 1, kw 2]: each kernel position keeps its two largest input channels
    # (TensorRT's groups), not two of four neighbours in the flattened [out, in * kh * kw]
    weight = torch.zeros(1, 4, 1, 2)
    weight[0, :, 0, 0] = torch.tensor([1.0, -4.0, 3.0, 2.0])
    weight[0, :, 0, 1] = torch.tensor([0.5, 0.1, -0.2, 0.3])
    mask = pruning.mask_2to4(weight)
    assert mask[0, :, 0, 0].tolist() == [False, True, True, False]
    assert mask[0, :, 0, 1].tolist() == [True, False, False, True]
    assert pruning.is_2to4(weight * mask)
    assert not pruning.is_2to4(weight)
    assert not pruning.is_2to4(torch.ones(8, 3, 3, 3))  # 3 input channels: does not fit
    linear = torch.tensor([[0.1, 0.9, -0.8, 0.2, 5.0, 4.0, 3.0, 2.0]])
    assert pruning.mask_2to4(linear).tolist() == [
        [False, True, True, False, True, True, False, False]
    ]
    with pytest.raises(InvalidArgument, match="does not fit 2:4"):
        pruning.mask_2to4(torch.ones(8, 3, 3, 3))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5, math.nan, True])
def test_a_ratio_outside_0_1_is_refused(ratio: float) -> None:
    model, sample = _zoo_model("small_cnn")
    with pytest.raises(InvalidArgument, match="strictly between 0 and 1"):
        pruning.prune_structured(model, sample[:1], ratio)
    with pytest.raises(InvalidArgument, match="strictly between 0 and 1"):
        pruning.prune_unstructured(model, ratio)


def test_an_unknown_method_is_refused() -> None:
    model, _ = _zoo_model("small_cnn")
    with pytest.raises(InvalidArgument, match="unknown pruning method"):
        pruning.summarize("magic", model, model)  # type: ignore[arg-type]
