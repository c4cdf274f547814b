"""The benchmark models, exported to ONNX (opset 17, dynamic batch).

`convnet` is ResNet-18 (torchvision's architecture, 11.7 M parameters, random weights) on
1x3x224x224 images: compute-bound, 40-46 ms per image (min-median) on one core of the 2-vCPU
bench VM with ONNX Runtime at intra_op_num_threads=1. It is the conv net the node's goals are
held to. `convnet-small` is a smaller ResNet (one BasicBlock per stage, 32 to 256 channels),
6-7 ms per image the same way: the transport-bound case. The Python gRPC transport of its
600 KB request costs ~2.4 ms of CPU per request (server and client together), about a third of
its compute, which caps any Python gRPC server at about 0.74x in-process throughput on it; it
is kept to show that cost, and what system shared memory saves of it. The MLP is four
2048-wide Linear+ReLU layers (64 MiB of weights, 8 KiB per request): memory-bound, so a batch
of 8 costs barely more than a batch of 1 and dynamic batching shows. `addsub` is Triton's
`simple` model (two INT32 [-1, 16] inputs, their sum and difference), built with onnx.helper:
almost no compute, so it measures what a server costs per request.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

OPSET = 17
MODELS = ("convnet", "convnet-small", "mlp", "addsub")

Array = npt.NDArray[Any]
Feed = dict[str, Array]  # one request's inputs by name

_DATATYPES: dict[int, str] = {TensorProto.FLOAT: "FP32", TensorProto.INT32: "INT32"}  # ONNX: Triton
_NUMPY = {"FP32": np.float32, "INT32": np.int32}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a batch-1 request: name, Triton datatype, shape (batch first)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(_NUMPY[self.datatype])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def random(self, rng: np.random.Generator) -> Array:
        if self.datatype == "INT32":
            return rng.integers(-1000, 1000, self.shape, dtype=np.int32)
        return rng.standard_normal(self.shape, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One exported model: its file, the tensors of a batch-1 request and, where numpy can
    compute it, the answer a correct server gives (else ONNX Runtime's answer is the one)."""

    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    expected: Callable[[Feed], list[Array]] | None = None

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    def sample(self, seed: int = 0) -> Feed:
        rng = np.random.default_rng(seed)
        return {tensor.name: tensor.random(rng) for tensor in self.inputs}


def read_spec(name: str, path: Path) -> ModelSpec:
    """The tensors an ONNX file declares, its symbolic (batch) dimension set to 1."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def tensors(values: Iterable[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                value.name,
                _DATATYPES[value.type.tensor_type.elem_type],
                tuple(dim.dim_value or 1 for dim in value.type.tensor_type.shape.dim),
            )
            for value in values
        )

    return ModelSpec(name, path, tensors(graph.input), tensors(graph.output))


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
    """`module` as ONNX with one FP32 input `input` of `shape` and one output `output`."""
    path = directory / f"{name}.onnx"
    sample = torch.from_numpy(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; the dynamo one needs onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return read_spec(name, path)


def addsub(directory: Path, width: int = 16) -> ModelSpec:
    """Triton's `simple`: INPUT0, INPUT1 INT32 [-1, 16] to OUTPUT0 = sum, OUTPUT1 = difference."""

    def tensors(*names: str) -> list[onnx.ValueInfoProto]:
        return [
            helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", width]) for n in names
        ]

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "addsub",
        tensors("INPUT0", "INPUT1"),
        tensors("OUTPUT0", "OUTPUT1"),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    path = directory / "addsub.onnx"
    onnx.save(model, str(path))
    return replace(read_spec("addsub", path), expected=_add_sub)


def _add_sub(feed: Feed) -> list[Array]:
    return [feed["INPUT0"] + feed["INPUT1"], feed["INPUT0"] - feed["INPUT1"]]


_BUILDERS: dict[str, Callable[[Path], ModelSpec]] = {
    "convnet": lambda d: export(resnet18(), "convnet", (1, 3, 224, 224), d),
    "convnet-small": lambda d: export(convnet_small(), "convnet-small", (1, 3, 224, 224), d),
    "mlp": lambda d: export(mlp(), "mlp", (1, 2048), d),
    "addsub": addsub,
}


def build_models(directory: Path, names: Iterable[str] = MODELS) -> list[ModelSpec]:
    """The models named, in `MODELS` order; each one's random weights seeded alike."""
    wanted = set(names)
    specs = []
    for name in MODELS:
        if name in wanted:
            torch.manual_seed(0)
            specs.append(_BUILDERS[name](directory))
    return specs
