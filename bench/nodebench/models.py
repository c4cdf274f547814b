"""The benchmark models, defined in torch and exported to ONNX (opset 17, dynamic batch).

`convnet` is ResNet-18 (torchvision's architecture, 11.7 M parameters, random weights) on
1x3x224x224 images: compute-bound, 40-46 ms per image (min-median) on one core of the 2-vCPU
bench VM with ONNX Runtime at intra_op_num_threads=1. It is the conv net the node's goals are
held to. `convnet-small` is a smaller ResNet (one BasicBlock per stage, 32 to 256 channels),
6-7 ms per image the same way: the transport-bound case. The Python gRPC transport of its
600 KB request costs ~2.4 ms of CPU per request (server and client together), about a third of
its compute, which caps any Python gRPC server at about 0.74x in-process throughput on it; it
is kept to show that cost. The MLP is four 2048-wide Linear+ReLU layers (64 MiB of weights,
8 KiB per request): memory-bound, so a batch of 8 costs barely more than a batch of 1 and
dynamic batching shows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

OPSET = 17


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One exported model: its file and the shape of one batch-1 request."""

    name: str
    path: Path
    input_name: str
    output_name: str
    shape: tuple[int, ...]

    def sample(self, seed: int = 0) -> npt.NDArray[np.float32]:
        return np.random.default_rng(seed).standard_normal(self.shape, dtype=np.float32)


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3, 1)
        )
        self.skip: nn.Module = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(*_conv_bn(cin, cout, 1, stride))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


def resnet18(classes: int = 1000) -> nn.Module:
    """ResNet-18 as torchvision builds it: a 7x7/2 stem and max-pool, four stages of two
    BasicBlocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), average-pool, fc."""
    stages: list[nn.Module] = []
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [_Residual(cin, cout, stride), _Residual(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        *_conv_bn(3, 64, 7, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, classes),
    )


def convnet_small(width: int = 32, classes: int = 1000) -> nn.Module:
    """A smaller ResNet: the same stem, one BasicBlock per stage, `width` to 8 x `width`."""
    return nn.Sequential(
        *_conv_bn(3, width, 7, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        _Residual(width, width, 1),
        _Residual(width, 2 * width, 2),
        _Residual(2 * width, 4 * width, 2),
        _Residual(4 * width, 8 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * width, classes),
    )


def mlp(width: int = 2048, layers: int = 4) -> nn.Module:
    """A stack of width x width Linear+ReLU layers."""
    stack: list[nn.Module] = []
    for _ in range(layers):
        stack += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*stack)


def export(module: nn.Module, name: str, shape: tuple[int, ...], directory: Path) -> ModelSpec:
    spec = ModelSpec(name, directory / f"{name}.onnx", "input", "output", shape)
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; the dynamo one needs onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(spec.sample()),),
            str(spec.path),
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return spec


def build_models(directory: Path) -> list[ModelSpec]:
    torch.manual_seed(0)
    return [
        export(resnet18(), "convnet", (1, 3, 224, 224), directory),
        export(convnet_small(), "convnet-small", (1, 3, 224, 224), directory),
        export(mlp(), "mlp", (1, 2048), directory),
    ]
