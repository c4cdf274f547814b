"""The model zoo: every architecture for any input size, channel and class count, scaled by
width and depth, exported to ONNX with the same outputs under ONNX Runtime."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from kapi.core.errors import AlreadyExists, InvalidArgument
from kapi.trainer.models import build, names, options, register
from kapi.trainer.models._layers import DropPath, make_divisible, scale_repeats
from torch import nn

MODELS = names()
INPUTS = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


def _parameters(name: str, **arguments: float) -> int:
    # On the meta device nothing is allocated or initialized: only the shapes count.
    with torch.device("meta"):
        model = build(name, in_channels=3, num_classes=10, **arguments)
    return sum(parameter.numel() for parameter in model.parameters())


def _calibrated(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """`model` in eval mode with batch-norm statistics from `sample`: at initialization they
    are (0, 1), which shrinks deep networks' outputs to ~1e-12 and any comparison to noise."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: the one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(sample)
    return model.eval()


def _export(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (sample,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip


def test_the_zoo_has_the_four_architectures() -> None:
    assert MODELS == ["efficientnet_b0", "mobilenet_v2", "resnet18", "small_cnn"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", INPUTS, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("num_classes", [10, 3])
def test_forward_gives_one_row_of_logits_per_image(
    name: str, shape: tuple[int, int, int], num_classes: int
) -> None:
    torch.manual_seed(0)
    model = build(name, in_channels=shape[0], num_classes=num_classes, width=0.25)
    with torch.no_grad():
        logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODELS)
def test_width_scales_the_parameters(name: str) -> None:
    counts = [_parameters(name, width=width) for width in (0.5, 1.0, 2.0)]
    assert counts == sorted(set(counts))


@pytest.mark.parametrize("name", MODELS)
def test_depth_scales_the_parameters(name: str) -> None:
    assert _parameters(name, depth=1.0) < _parameters(name, depth=2.0)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v2", "resnet18"])
def test_depth_below_one_keeps_fewer_blocks(name: str) -> None:
    assert _parameters(name, depth=0.5) < _parameters(name, depth=1.0)


@pytest.mark.parametrize("name", MODELS)
def test_channels_are_multiples_of_eight_at_any_width(name: str) -> None:
    with torch.device("meta"):
        model = build(name, in_channels=1, num_classes=3, width=0.3)
    widths = {m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert widths
    assert all(width % 8 == 0 for width in widths), sorted(widths)


def test_the_scaling_rules() -> None:
    assert [make_divisible(value) for value in (1, 8, 12, 16 * 0.35, 1280 * 1.4)] == [
        8, 8, 16, 8, 1792,
    ]  # fmt: skip
    assert make_divisible(27) == 32  # 24 would be more than 10% below 27
    assert [scale_repeats(4, depth) for depth in (0.1, 0.5, 1.0, 1.1, 3.1)] == [1, 2, 4, 5, 13]
    assert scale_repeats(10, 0.3) == 3  # not 4: 10 * 0.3 is 3.0000000000000004 in floats


@pytest.mark.parametrize(
    ("input_size", "kernel", "pools", "side"),
    [(8, 3, 0, 4), (64, 3, 0, 4), (65, 7, 1, 1), (224, 7, 1, 1)],
)
def test_resnet18_takes_the_small_image_stem_up_to_64_px(
    input_size: int, kernel: int, pools: int, side: int
) -> None:
    model = build("resnet18", in_channels=3, num_classes=10, width=0.25, input_size=input_size)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.kernel_size == (kernel, kernel)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    with torch.no_grad():
        features = model.eval().get_submodule("features")(torch.zeros(1, 3, 32, 32))
    assert features.shape[-1] == side  # the ImageNet stem takes 32 px to 8 before stage one


def test_stochastic_depth_drops_whole_samples_only_while_training() -> None:
    torch.manual_seed(0)
    drop_path = DropPath(0.5)
    ones = torch.ones(64, 4, 2, 2)
    kept = drop_path(ones).flatten(1)
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # survivors are scaled by 1 / (1 - p)
    assert (kept == kept[:, :1]).all()
    assert torch.equal(drop_path.eval()(ones), ones)


def test_efficientnet_with_stochastic_depth_is_deterministic_in_eval() -> None:
    torch.manual_seed(0)
    model = build("efficientnet_b0", in_channels=1, num_classes=3, width=0.25, drop_path_rate=0.5)
    sample = torch.randn(2, 1, 16, 16)
    model = _calibrated(model, sample)
    with torch.no_grad():
        assert torch.equal(model(sample), model(sample))


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_torch(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build(name, in_channels=3, num_classes=10, width=0.25)
    model = _calibrated(model, torch.randn(64, 3, 32, 32))
    path = tmp_path / f"{name}.onnx"
    _export(model, torch.zeros(1, 3, 32, 32), path)
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images).numpy()
        (logits,) = session.run(["logits"], {"input": images.numpy()})
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match="unknown model 'vgg16'") as caught:
        build("vgg16", in_channels=3, num_classes=10)
    assert all(name in caught.value.message for name in MODELS)


@pytest.mark.parametrize(
    "arguments",
    [
        {"in_channels": 0},
        {"num_classes": 0},
        {"num_classes": 2.5},
        {"width": 0.0},
        {"width": -1.0},
        {"width": math.nan},
        {"depth": 0.0},
        {"depth": math.inf},
        {"kernel": 3},
    ],
    ids=str,
)
@pytest.mark.parametrize("name", MODELS)
def test_invalid_arguments_are_refused(name: str, arguments: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match=f"model '{name}': "):
        build(name, **{"in_channels": 3, "num_classes": 10, **arguments})


@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("resnet18", {"input_size": 0}),
        ("resnet18", {"dropout": 0.1}),  # ResNet has no dropout
        ("small_cnn", {"dropout": 1.0}),
        ("mobilenet_v2", {"dropout": -0.1}),
        ("efficientnet_b0", {"drop_path_rate": 1.0}),
    ],
    ids=str,
)
def test_model_specific_arguments_are_checked(name: str, arguments: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match=f"model '{name}': "):
        build(name, in_channels=3, num_classes=10, **arguments)


def test_a_name_registers_once() -> None:
    with pytest.raises(AlreadyExists, match="resnet18"):
        register("resnet18")(nn.Identity)


def test_the_zoo_says_which_options_a_model_takes() -> None:
    assert "input_size" in options("resnet18")
    assert "input_size" not in options("small_cnn")
    assert "width" not in options("mobilenet_v2")  # a common one, not an option
    with pytest.raises(InvalidArgument, match="unknown model 'nope'"):
        options("nope")
