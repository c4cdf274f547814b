"""The formal verifier: certificates that no L∞ perturbation within ε of a test input changes
an image classifier's prediction, computed on the ONNX graph that is served.

The graph is read into torch operations (`load_graph`), in topological order, each either
linear (Conv, Gemm, MatMul with a constant, Add/Sub of tensors, affine arithmetic with
constants, BatchNormalization, AveragePool, GlobalAveragePool, Flatten, Reshape, Identity) or
one of the monotone piecewise linear functions ReLU networks are made of (Relu, LeakyRelu,
Clip, MaxPool). Any other operator makes the model not verifiable (`NotVerifiable` names
it): no certificate is ever given for a graph that is not bounded in full.

Bounds on a box of inputs, three methods:

    ibp        interval bound propagation, layer by layer
    crown-ibp  IBP bounds for every intermediate layer; the output bounded by CROWN
    crown      CROWN everywhere (the default): the pre-activations of each nonlinearity
               that IBP leaves unstable are bounded by CROWN before it is relaxed

CROWN bounds a linear function of a tensor (the rows of a matrix A) by back-substitution:
A is carried backwards through the graph, through linear operations by their transposes
(their vector-Jacobian products) and through each nonlinearity by a linear relaxation of it,
and bounded over the input box at the end. A ReLU whose pre-activation lies in [l, u] with
l < 0 < u is bounded above by the line through (l, 0) and (u, u) and below by y >= 0 or
y >= x, whichever leaves the smaller area (CROWN's adaptive choice); LeakyRelu and Clip
alike. A max-pool is bounded below by the input of its window with the largest lower bound,
and above by that input exactly when its lower bound is above every other input's upper
bound, else by the window's largest upper bound, a constant. An intermediate neuron's rows
live in windows of its receptive field on spatial tensors, not in whole tensors, which
makes full CROWN affordable on CPUs. Every bound is intersected with the interval bound.
Bounds are computed in float32, without directed rounding.

A sample is certified when the model classifies it correctly and, for every other class j,
the lower bound of logit_label - logit_j over the box is positive: the bound of the
difference itself, not a difference of two intervals.

`pgd_attack` is the counterpart: projected gradient descent on the same graph, in torch,
that finds perturbations that do flip predictions. No certified input may be flipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from kapi.core.errors import InvalidArgument, MissingExtra

try:
    import torch
    from torch.nn import functional
except ImportError as exc:  # pragma: no cover - depends on the image
    raise MissingExtra("torch", "trainer") from exc

if TYPE_CHECKING:
    from kapi.trainer.data.preprocess import Preprocessing
    from kapi.verifier.evidence import Holdout

Tensor = torch.Tensor
Box = tuple[Tensor, Tensor]
Shape = tuple[int, ...]
Shapes = list[Shape]
Array = npt.NDArray[Any]
Bound = float | Array  # a scalar, or an array that broadcasts to the input batch
Method = Literal["ibp", "crown-ibp", "crown"]
METHODS: tuple[Method, ...] = get_args(Method)
DEFAULT_METHOD: Method = "crown"
BATCH = 32  # samples bounded together
ROW_ELEMENTS = 1 << 21  # floats in a coefficient tensor, at most (8 MB: no fresh pages)
SUPPORTED = (
    "Conv, Gemm, MatMul (with a constant), Add, Sub, Mul, Div (by constants), Relu, "
    "LeakyRelu, Clip, BatchNormalization, MaxPool, AveragePool, GlobalAveragePool, Flatten, "
    "Reshape, Identity, Constant"
)


class NotVerifiable(InvalidArgument):
    """The graph holds operators (or operator settings) the verifier cannot bound; no
    certificate is given for it. `operators` are their ONNX types, `nodes` their nodes."""

    def __init__(self, model: str, refused: Sequence[tuple[str, str, str]]) -> None:
        self.operators = sorted({kind for kind, _, _ in refused})
        self.nodes = [name for _, name, _ in refused]
        parts = []
        for kind in self.operators:
            mine = [(name, why) for k, name, why in refused if k == kind]
            name, why = mine[0]
            where = f"node '{name}'" if len(mine) == 1 else f"{len(mine)} nodes, e.g. '{name}'"
            parts.append(f"{kind} ({where}{': ' + why if why else ''})")
        super().__init__(
            f"{model} is not verifiable: the formal verifier cannot bound {'; '.join(parts)}. "
            f"It bounds ReLU-family networks of {SUPPORTED}"
        )


class _Unsupported(Exception):
    """An operation refuses the tensors it is given (the graph names the node)."""


# ---------------------------------------------------------------------------------------
# Operations


class Op:
    """An operation on tensors whose first dimension is the batch (or, when bounding, the
    rows of a coefficient matrix); every other dimension is one sample's."""

    nonlinear = False

    def forward(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def relax(self, lower: Tensor, upper: Tensor) -> Any:
        """A nonlinear operation's linear bounds, given its input's bounds."""
        raise NotImplementedError

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Where tighter bounds of a nonlinear operation's input would tighten its own."""
        raise NotImplementedError

    def interval(self, *boxes: Box) -> Box:
        """Bounds of the output, given bounds of each input."""
        raise NotImplementedError

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        """Back-substitution of the lower bound of `rows` · output (`shape` per sample): the
        coefficients on each input (`shapes`) and the constant term per row (None: 0).
        `owner` is each row's sample, `relaxation` what `relax` gave for the batch."""
        raise NotImplementedError


class Linear(Op):
    """An affine operation: `linear` (its linear part) plus `bias` (None: zero)."""

    exact = False  # IBP bounds the output as tightly as CROWN would (elementwise, reshapes)
    bias: Tensor | None = None

    def linear(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def absolute(self, *inputs: Tensor) -> Tensor:
        """The linear part with every weight replaced by its absolute value."""
        raise NotImplementedError

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        """The linear part's transpose applied to `rows` (the vector-Jacobian product)."""
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> Tensor:
        out = self.linear(*inputs)
        return out if self.bias is None else out + self.bias

    def interval(self, *boxes: Box) -> Box:
        centre = self.forward(*((lo + hi) / 2 for lo, hi in boxes))
        radius = self.absolute(*((hi - lo) / 2 for lo, hi in boxes))
        return centre - radius, centre + radius

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        values = rows.dense(shape)
        constant = None if self.bias is None else _dot(values, self.bias)
        return [Coefficients(part) for part in self.transpose(values, shapes)], constant


def _dot(rows: Tensor, values: Tensor) -> Tensor:
    """Each row's inner product with `values` (broadcast to the row's shape)."""
    if values.shape == rows.shape:
        count = rows.shape[0]
        return torch.bmm(rows.reshape(count, 1, -1), values.reshape(count, -1, 1)).view(count)
    return (rows * values).flatten(1).sum(1)


@dataclass(frozen=True)
class Coefficients:
    """Rows of linear coefficients on one tensor, row i for sample owner[i]. Dense: values
    [R, *shape]. Or, on a [C, H, W] tensor, windows: values [R, C, h, w], row i's window at
    (top, left) = origin[i] of the tensor, zero wherever it lies outside the tensor (a
    neuron's coefficients are zero outside its receptive field, so windows save the work)."""

    values: Tensor
    origin: Tensor | None = None  # [R, 2] int64; None: dense

    def dense(self, shape: Shape) -> Tensor:
        """The rows as [R, *shape]."""
        if self.origin is None:
            return self.values
        rows, channels, height, width = self.values.shape
        ys, xs, valid = _grid(self.origin, (height, width), shape[1:])
        flat = (ys[:, :, None] * shape[2] + xs[:, None, :]).reshape(rows, 1, -1)
        out = torch.zeros((rows, channels, shape[1] * shape[2]), dtype=self.values.dtype)
        out.scatter_add_(2, flat.expand(rows, channels, -1), (self.values * valid).flatten(2))
        return out.reshape(rows, *shape)

    def gather(self, tensor: Tensor, owner: Tensor) -> Tensor:
        """Each row's part of the per-sample `tensor` [B, *shape], shaped as the rows."""
        if self.origin is None:
            return tensor[owner]
        _, channels, height, width = tensor.shape
        size = tuple(self.values.shape[2:])
        ys, xs, _ = _grid(self.origin, size, (height, width))
        flat = (owner[:, None, None] * height + ys[:, :, None]) * width + xs[:, None, :]
        table = tensor.permute(0, 2, 3, 1).reshape(-1, channels)  # one row per position
        patch = table.index_select(0, flat.flatten()).reshape(len(owner), *size, channels)
        return patch.permute(0, 3, 1, 2)


def _grid(
    origin: Tensor, size: tuple[int, ...], bounds: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """Windows' rows [R, h] and columns [R, w] in the tensor, clamped into it, and whether
    each position [R, 1, h, w] lies inside it."""
    ys = origin[:, :1] + torch.arange(size[0])
    xs = origin[:, 1:] + torch.arange(size[1])
    inside_y = (ys >= 0) & (ys < bounds[0])
    inside_x = (xs >= 0) & (xs < bounds[1])
    valid = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return ys.clamp(0, bounds[0] - 1), xs.clamp(0, bounds[1] - 1), valid


def _windows(values: Tensor, origin: Tensor, shape: Shape) -> Coefficients:
    """Windowed rows on a tensor of `shape`, zeroed outside it; dense once a window is no
    smaller than the tensor."""
    height, width = values.shape[2:]
    if height * width >= shape[1] * shape[2]:
        return Coefficients(Coefficients(values, origin).dense(shape))
    inside = (origin >= 0).all() and (
        origin + torch.tensor([height, width]) <= torch.tensor(shape[1:])
    ).all()
    if bool(inside):
        return Coefficients(values, origin)
    _, _, valid = _grid(origin, (height, width), shape[1:])
    return Coefficients(values * valid, origin)


def _merge(a: Coefficients, b: Coefficients, shape: Shape) -> Coefficients:
    """a + b: windowed when both windows keep the same offset from each other on every row
    (the paths of a residual block), else dense."""
    if a.origin is None or b.origin is None:
        return Coefficients(a.dense(shape) + b.dense(shape))
    shift = b.origin - a.origin
    if not bool((shift == shift[:1]).all()):
        return Coefficients(a.dense(shape) + b.dense(shape))
    dy, dx = int(shift[0, 0]), int(shift[0, 1])
    (ha, wa), (hb, wb) = a.values.shape[2:], b.values.shape[2:]
    top, left = min(0, dy), min(0, dx)
    bottom, right = max(ha, dy + hb), max(wa, dx + wb)
    first = functional.pad(a.values, (-left, right - wa, -top, bottom - ha))
    second = functional.pad(b.values, (dx - left, right - dx - wb, dy - top, bottom - dy - hb))
    origin = a.origin + torch.tensor([top, left])
    return _windows(first + second, origin, shape)


def _vjp(function: Callable[[Tensor], Tensor], rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The transpose of the linear `function` applied to `rows`, by autograd."""
    with torch.enable_grad():
        zeros = torch.zeros((rows.shape[0], *shape), dtype=rows.dtype, requires_grad=True)
        (grad,) = torch.autograd.grad(function(zeros), zeros, grad_outputs=rows)
    return grad


class Identity(Linear):
    exact = True

    def linear(self, *inputs: Tensor) -> Tensor:
        return inputs[0]

    def absolute(self, *inputs: Tensor) -> Tensor:
        return inputs[0]

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [rows]

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        return [rows], None


class Conv(Linear):
    """A 2-D convolution; pads (top, left, bottom, right) may be asymmetric."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        strides: tuple[int, int],
        pads: tuple[int, int, int, int],
        dilations: tuple[int, int],
        groups: int,
    ) -> None:
        self.weight, self.strides, self.dilations, self.groups = weight, strides, dilations, groups
        self.bias = None if bias is None else bias.reshape(-1, 1, 1)
        top, left, bottom, right = pads
        self.symmetric = top == bottom and left == right
        self.padding = (top, left) if self.symmetric else (0, 0)
        self.pad = (0, 0, 0, 0) if self.symmetric else (left, right, top, bottom)
        self.magnitude = weight.abs()
        self.begin = (top, left)

    def _convolve(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.dim() != 4:
            raise _Unsupported(f"a 2-D convolution of a {x.dim()}-D tensor")
        if not self.symmetric:
            x = functional.pad(x, self.pad)
        return functional.conv2d(
            x, weight, None, self.strides, self.padding, self.dilations, self.groups
        )

    def linear(self, *inputs: Tensor) -> Tensor:
        return self._convolve(inputs[0], self.weight)

    def absolute(self, *inputs: Tensor) -> Tensor:
        return self._convolve(inputs[0], self.magnitude)

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        _, height, width = shapes[0]
        left, right, top, bottom = self.pad
        size = (height + top + bottom, width + left + right)
        extra = [
            size[axis]
            - ((rows.shape[axis + 2] - 1) * self.strides[axis] - 2 * self.padding[axis]
               + self.dilations[axis] * (self.weight.shape[axis + 2] - 1) + 1)
            for axis in (0, 1)
        ]  # fmt: skip
        out = functional.conv_transpose2d(
            rows,
            self.weight,
            None,
            self.strides,
            self.padding,
            (extra[0], extra[1]),
            self.groups,
            self.dilations,
        )
        return [out[:, :, top : top + height, left : left + width]]

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        if rows.origin is None:
            return super().substitute(rows, owner, relaxation, shapes, shape)
        constant = None if self.bias is None else _dot(rows.values, self.bias)
        window = functional.conv_transpose2d(
            rows.values, self.weight, None, self.strides, 0, 0, self.groups, self.dilations
        )
        origin = rows.origin * torch.tensor(self.strides) - torch.tensor(self.begin)
        return [_windows(window, origin, shapes[0])], constant


class Dense(Linear):
    """x @ weight + bias, with a constant [K, M] weight: Gemm, or MatMul by a constant."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias, self.magnitude = weight, bias, weight.abs()

    def linear(self, *inputs: Tensor) -> Tensor:
        return inputs[0] @ self.weight

    def absolute(self, *inputs: Tensor) -> Tensor:
        return inputs[0] @ self.magnitude

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [rows @ self.weight.T]


class LeftMatMul(Linear):
    """weight @ x, with a constant [P, K] weight and x of per-sample shape [..., K, M]."""

    def __init__(self, weight: Tensor) -> None:
        self.weight, self.magnitude = weight, weight.abs()

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise _Unsupported("a constant times the batch: it mixes samples")
        return x

    def linear(self, *inputs: Tensor) -> Tensor:
        return self.weight @ self._check(inputs[0])

    def absolute(self, *inputs: Tensor) -> Tensor:
        return self.magnitude @ self._check(inputs[0])

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [self.weight.T @ rows]


class Affine(Linear):
    """x * scale + shift, elementwise with constants; `per_channel` ones are [C] vectors
    over dimension 1 (batch normalization)."""

    exact = True

    def __init__(self, scale: Tensor, shift: Tensor, *, per_channel: bool = False) -> None:
        self.scale, self.shift, self.per_channel = scale, shift, per_channel

    def _shaped(self, value: Tensor, rank: int) -> Tensor:
        return value.reshape(-1, *[1] * (rank - 2)) if self.per_channel else value

    def forward(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        out = x * self._shaped(self.scale, x.dim()) + self._shaped(self.shift, x.dim())
        if out.shape != x.shape:
            raise _Unsupported(f"a constant of shape {list(self.scale.shape)} broadcasts x")
        return out

    def linear(self, *inputs: Tensor) -> Tensor:
        return inputs[0] * self._shaped(self.scale, inputs[0].dim())

    def absolute(self, *inputs: Tensor) -> Tensor:
        return inputs[0] * self._shaped(self.scale, inputs[0].dim()).abs()

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        scale, shift = (self._shaped(c, len(shape) + 1) for c in (self.scale, self.shift))
        if rows.origin is not None and not (_channelwise(scale) and _channelwise(shift)):
            rows = Coefficients(rows.dense(shape))
        return [Coefficients(rows.values * scale, rows.origin)], _dot(rows.values, shift)


def _channelwise(constant: Tensor) -> bool:
    """Whether the constant is the same at every position of a [C, H, W] tensor."""
    return (constant.dim() < 2 and constant.numel() == 1) or tuple(constant.shape[-2:]) == (1, 1)


class Sum(Linear):
    """signs[0] * a + signs[1] * b, of two tensors of the same rank: Add and Sub."""

    def __init__(self, signs: tuple[float, float]) -> None:
        self.signs = signs

    def _check(self, a: Tensor, b: Tensor) -> None:
        if a.dim() != b.dim():
            raise _Unsupported("an Add of tensors of different ranks")

    def linear(self, *inputs: Tensor) -> Tensor:
        self._check(*inputs)
        return self.signs[0] * inputs[0] + self.signs[1] * inputs[1]

    def absolute(self, *inputs: Tensor) -> Tensor:
        return inputs[0] + inputs[1]

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [
            (sign * rows).sum_to_size((rows.shape[0], *shape))
            for sign, shape in zip(self.signs, shapes, strict=True)
        ]

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        if any(tuple(s) != tuple(shape) for s in shapes):
            return super().substitute(rows, owner, relaxation, shapes, shape)
        return [Coefficients(sign * rows.values, rows.origin) for sign in self.signs], None


class Reshape(Linear):
    """ONNX Reshape to a constant shape whose first entry keeps the batch (0 or -1)."""

    exact = True

    def __init__(self, shape: tuple[int, ...], allowzero: bool = False) -> None:
        self.shape, self.allowzero = shape, allowzero

    def target(self, sample: tuple[int, ...]) -> tuple[int, ...]:
        """One sample's shape after the reshape, or _Unsupported if it moves the batch."""
        head, rest = self.shape[0], list(self.shape[1:])
        if head not in (0, -1) or (head == -1 and -1 in rest) or (self.allowzero and head == 0):
            raise _Unsupported(f"a reshape to {list(self.shape)}: it does not keep the batch")
        for i, size in enumerate(rest):
            if size == 0 and not self.allowzero:
                rest[i] = sample[i] if i < len(sample) else 0
        numel = math.prod(sample)
        if -1 in rest:
            known = math.prod(size for size in rest if size != -1)
            rest[rest.index(-1)] = numel // known if known else 0
        if math.prod(rest) != numel:
            raise _Unsupported(f"a reshape to {list(self.shape)}: it does not keep the batch")
        return tuple(rest)

    def linear(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        return x.reshape(x.shape[0], *self.target(tuple(x.shape[1:])))

    def absolute(self, *inputs: Tensor) -> Tensor:
        return self.linear(*inputs)

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [rows.reshape(rows.shape[0], *shapes[0])]


class Flatten(Reshape):
    """ONNX Flatten at axis 1 (another axis would mix the samples)."""

    def __init__(self, axis: int) -> None:
        super().__init__((0, -1))
        self.axis = axis

    def linear(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        if self.axis not in (1, 1 - x.dim()):
            raise _Unsupported(f"a Flatten at axis {self.axis}: it mixes the samples")
        return x.reshape(x.shape[0], -1)


class GlobalAveragePool(Linear):
    def linear(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)

    def absolute(self, *inputs: Tensor) -> Tensor:
        return self.linear(*inputs)

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        spatial = shapes[0][1:]
        return [rows.expand(rows.shape[0], *shapes[0]) / math.prod(spatial)]


@dataclass(frozen=True)
class Window:
    """A 2-D pooling window's geometry, ONNX's attributes."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    ceil_mode: bool

    def extent(self, axis: int) -> int:
        return (self.kernel[axis] - 1) * self.dilations[axis] + 1

    def outputs(self, size: int, axis: int) -> int:
        """The output size along `axis`, as ONNX Runtime (and PyTorch) count it: with
        ceil_mode a last window that would start in the end padding is dropped."""
        begin, end, stride = self.pads[axis], self.pads[axis + 2], self.strides[axis]
        span = size + begin + end - self.extent(axis)
        if span < 0 or max(begin, end) >= self.extent(axis):
            raise _Unsupported(f"a pooling window that fits no input ({self})")
        count = (-(-span // stride) if self.ceil_mode else span // stride) + 1
        if self.ceil_mode and (count - 1) * stride >= size + begin:
            count -= 1
        return count

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """functional.pad's (left, right, top, bottom) that makes every window whole."""
        ends = [
            max(0, (self.outputs(size, axis) - 1) * self.strides[axis] + self.extent(axis)
                - size - self.pads[axis])
            for axis, size in ((0, height), (1, width))
        ]  # fmt: skip
        return (self.pads[1], ends[1], self.pads[0], ends[0])

    def pooled(self, x: Tensor) -> tuple[int, int]:
        if x.dim() != 4:
            raise _Unsupported(f"2-D pooling of a {x.dim()}-D tensor")
        return self.outputs(x.shape[2], 0), self.outputs(x.shape[3], 1)


class AveragePool(Linear):
    """ONNX AveragePool (no dilation): each window's sum over its count, which takes in the
    declared pads with count_include_pad, never the extra end of a ceil_mode window."""

    def __init__(self, window: Window, count_include_pad: bool) -> None:
        self.window, self.count_include_pad = window, count_include_pad
        self._counts: dict[tuple[int, int, torch.dtype], Tensor] = {}

    def _counts_for(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        key = (height, width, dtype)
        if key not in self._counts:
            top, left, bottom, right = self.window.pads
            counted = torch.ones((1, 1, height, width), dtype=dtype)
            if self.count_include_pad:
                counted = functional.pad(counted, (left, right, top, bottom), value=1.0)
                pad = self.window.padding(height, width)
                counted = functional.pad(counted, (0, pad[1] - right, 0, pad[3] - bottom))
            else:
                counted = functional.pad(counted, self.window.padding(height, width))
            self._counts[key] = self._sums(counted)
        return self._counts[key]

    def _sums(self, padded: Tensor) -> Tensor:
        kernel = self.window.kernel
        pooled = functional.avg_pool2d(padded, kernel, self.window.strides, 0)
        return pooled * (kernel[0] * kernel[1])

    def linear(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        expected = self.window.pooled(x)
        sums = self._sums(functional.pad(x, self.window.padding(x.shape[2], x.shape[3])))
        if tuple(sums.shape[2:]) != expected:
            raise _Unsupported(f"an AveragePool of {list(x.shape[1:])} ({self.window})")
        return sums / self._counts_for(x.shape[2], x.shape[3], x.dtype)

    def absolute(self, *inputs: Tensor) -> Tensor:
        return self.linear(*inputs)

    def transpose(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        return [_vjp(self.linear, rows, shapes[0])]


# ---------------------------------------------------------------------------------------
# Piecewise linear operations and their relaxations


@dataclass(frozen=True)
class Lines:
    """Elementwise linear bounds of y = f(x) on [l, u]: lower * x + lower_offset <= y <=
    upper * x + upper_offset, packed along dimension 1 (gathered at once); the lower lines
    of the ReLU family pass through the origin, their offsets are not kept."""

    packed: Tensor
    lower_offsets: bool

    @staticmethod
    def of(
        lower: Tensor, lower_offset: Tensor | None, upper: Tensor, upper_offset: Tensor
    ) -> Lines:
        parts = [lower, upper, upper_offset] + ([] if lower_offset is None else [lower_offset])
        return Lines(torch.cat(parts, dim=1), lower_offset is not None)


class Piecewise(Op):
    """An elementwise, monotone, piecewise linear function, bounded by Lines."""

    nonlinear = True

    def interval(self, *boxes: Box) -> Box:
        lower, upper = boxes[0]
        return self.forward(lower), self.forward(upper)

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        """Positive coefficients take the lower line, negative ones the upper line."""
        lines: Lines = relaxation
        values = rows.values
        lower, upper, upper_offset, *rest = rows.gather(lines.packed, owner).chunk(
            4 if lines.lower_offsets else 3, 1
        )
        positive = values >= 0
        slopes = torch.where(positive, lower, upper)
        if rest:
            constant = _dot(values, torch.where(positive, rest[0], upper_offset))
        else:
            constant = _dot(values.clamp(max=0), upper_offset)
        return [Coefficients(values * slopes, rows.origin)], constant


class LeakyRelu(Piecewise):
    """max(x, alpha * x) with 0 <= alpha <= 1 (ReLU: alpha = 0)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def forward(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        return functional.relu(x) if self.alpha == 0 else functional.leaky_relu(x, self.alpha)

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        return (lower < 0) & (upper > 0)

    def relax(self, lower: Tensor, upper: Tensor) -> Lines:
        """The chord above; below, slope 1 or alpha, whichever has the smaller area."""
        alpha = self.alpha
        crossing = self.unstable(lower, upper)
        width = torch.where(crossing, upper - lower, torch.ones_like(upper))
        chord = (upper - alpha * lower) / width
        slope = torch.where(lower >= 0, 1.0, alpha)
        upper_slope = torch.where(crossing, chord, slope)
        upper_offset = torch.where(crossing, (alpha - chord) * lower, 0.0)
        lower_slope = torch.where(crossing, torch.where(upper >= -lower, 1.0, alpha), slope)
        return Lines.of(lower_slope, None, upper_slope, upper_offset)


class Clip(Piecewise):
    """min(max(x, low), high), either bound possibly absent (ReLU6: low 0, high 6)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high  # -inf, +inf where absent

    def forward(self, *inputs: Tensor) -> Tensor:
        low = None if math.isinf(self.low) else self.low
        high = None if math.isinf(self.high) else self.high
        return torch.clamp(inputs[0], low, high)

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        return ((lower < self.low) & (upper > self.low)) | (
            (lower < self.high) & (upper > self.high)
        )

    def relax(self, lower: Tensor, upper: Tensor) -> Lines:
        """The chord from (l, f(l)) to (u, f(u)) bounds f on one side (both where f is
        linear on [l, u]). Across the low kink alone f is convex: below it y >= x or
        y >= low, whichever has the smaller area; across the high kink alone, concave: above
        it y <= x or y <= high. Across both, the lines through (low, low) and (u, high)
        below, through (l, low) and (high, high) above."""
        a, b = self.low, self.high
        width = torch.where(upper > lower, upper - lower, torch.ones_like(upper))
        chord = (self.forward(upper) - self.forward(lower)) / width
        chord_offset = self.forward(lower) - chord * lower
        convex = (lower < a) & (upper > a) & (upper <= b)
        concave = (lower >= a) & (lower < b) & (upper > b)
        both = (lower < a) & (upper > b)
        identity_below = upper - a >= a - lower  # y >= x leaves the smaller area
        identity_above = upper - b < b - lower
        low_slope = torch.where(convex, identity_below.to(lower.dtype), chord)
        low_offset = torch.where(convex, torch.where(identity_below, 0.0, a), chord_offset)
        high_slope = torch.where(concave, identity_above.to(lower.dtype), chord)
        high_offset = torch.where(concave, torch.where(identity_above, 0.0, b), chord_offset)
        if math.isfinite(a) and math.isfinite(b) and bool(both.any()):
            rise = b - a
            below = rise / torch.where(both, upper - a, torch.ones_like(upper))
            above = rise / torch.where(both, b - lower, torch.ones_like(lower))
            low_slope = torch.where(both, below, low_slope)
            low_offset = torch.where(both, a - below * a, low_offset)
            high_slope = torch.where(both, above, high_slope)
            high_offset = torch.where(both, b - above * b, high_offset)
        return Lines.of(low_slope, low_offset, high_slope, high_offset)


@dataclass(frozen=True)
class Pick:
    """A max-pool's relaxation, per output: y >= x, the input of its window it picks, and
    y <= x where that is exact, else y <= the ceiling. Packed [B, 4C, H', W']: exact (1 or
    0), the ceiling (0 where exact), and the picked input's row and column in the window."""

    packed: Tensor


class MaxPool(Op):
    """ONNX MaxPool, 2-D, with pads, strides, dilations and ceil_mode."""

    nonlinear = True

    def __init__(self, window: Window) -> None:
        self.window = window

    def _padded(self, x: Tensor) -> Tensor:
        return functional.pad(x, self.window.padding(x.shape[2], x.shape[3]), value=-math.inf)

    def forward(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        expected = self.window.pooled(x)
        window = self.window
        out = functional.max_pool2d(
            self._padded(x), window.kernel, window.strides, 0, window.dilations
        )
        if tuple(out.shape[2:]) != expected:
            raise _Unsupported(f"a MaxPool of {list(x.shape[1:])} ({window})")
        return out

    def interval(self, *boxes: Box) -> Box:
        lower, upper = boxes[0]
        return self.forward(lower), self.forward(upper)

    def unstable(self, lower: Tensor, upper: Tensor) -> Tensor:
        return torch.ones_like(lower, dtype=torch.bool)

    def _windows(self, x: Tensor) -> Tensor:
        """[B, C, kernel elements, outputs]: each output's window."""
        window = self.window
        patches = functional.unfold(
            self._padded(x), window.kernel, window.dilations, 0, window.strides
        )
        return patches.reshape(x.shape[0], x.shape[1], -1, patches.shape[-1])

    def relax(self, lower: Tensor, upper: Tensor) -> Pick:
        window = self.window
        lows, highs = self._windows(lower), self._windows(upper)
        best = lows.argmax(dim=2, keepdim=True)
        floor = lows.gather(2, best)
        if not bool(torch.isfinite(floor).all()):
            raise _Unsupported(f"a MaxPool window that holds padding alone ({window})")
        others = highs.scatter(2, best, -math.inf).amax(dim=2, keepdim=True)
        exact = (floor >= others).squeeze(2)
        ceiling = torch.where(exact, 0.0, highs.amax(dim=2))
        best = best.squeeze(2)
        row = (best // window.kernel[1]) * window.dilations[0]
        column = (best % window.kernel[1]) * window.dilations[1]
        parts = (exact.to(lower.dtype), ceiling, row.to(lower.dtype), column.to(lower.dtype))
        shape = (lower.shape[0], lower.shape[1], *self.window.pooled(lower))
        return Pick(torch.cat([part.reshape(shape) for part in parts], dim=1))

    def substitute(
        self, rows: Coefficients, owner: Tensor, relaxation: Any, shapes: Shapes, shape: Shape
    ) -> tuple[list[Coefficients], Tensor | None]:
        """Each output's coefficient onto the input its relaxation picks, scattered into the
        window of the input that the output window reads."""
        pick: Pick = relaxation
        values = rows.values
        count, channels, height, width = values.shape
        negative = values.clamp(max=0)
        exact, ceiling, row, column = rows.gather(pick.packed, owner).chunk(4, dim=1)
        coefficients = values.clamp(min=0) + negative * exact
        constant = _dot(negative, ceiling)
        origin = torch.zeros((count, 2), dtype=torch.int64) if rows.origin is None else rows.origin
        strides = self.window.strides
        start = origin * torch.tensor(strides)  # of the window read, in the padded input
        size = (
            (height - 1) * strides[0] + self.window.extent(0),
            (width - 1) * strides[1] + self.window.extent(1),
        )
        corner = (
            torch.arange(height)[:, None] * (strides[0] * size[1])
            + torch.arange(width) * strides[1]
        )  # each output window's first input, in the window read
        local = (corner + row * size[1] + column).long()
        spread = torch.zeros((count, channels, size[0] * size[1]), dtype=values.dtype)
        spread.scatter_add_(2, local.flatten(2), coefficients.flatten(2))
        spread = spread.reshape(count, channels, size[0], size[1])
        begin = torch.tensor(self.window.pads[:2])
        return [_windows(spread, start - begin, shapes[0])], constant


# ---------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True)
class Node:
    op: Op
    inputs: tuple[str, ...]  # tensors computed from the graph's input
    output: str
    name: str  # the ONNX node's name
    kind: str  # its operator type


@dataclass(frozen=True)
class Graph:
    """An ONNX classifier as torch operations in topological order: one input (the batch
    first) and one output, the logits."""

    model: str  # the file's name, for messages
    input: str
    output: str
    sample_shape: tuple[int, ...] | None  # one input's shape, where the graph fixes it
    nodes: tuple[Node, ...]

    def values(self, x: Tensor) -> dict[str, Tensor]:
        """Every tensor the graph computes from the batch `x`."""
        values = {self.input: x}
        for node in self.nodes:
            values[node.output] = _run(
                self, node, node.op.forward, [values[i] for i in node.inputs]
            )
        return values

    def forward(self, x: Tensor) -> Tensor:
        """The logits of `x`, in torch (differentiable)."""
        return self.values(x)[self.output]

    def __call__(self, x: Array) -> npt.NDArray[np.float32]:
        """The logits of a batch of inputs, in batches."""
        if not len(x):
            return np.zeros((0, *self.shapes(tuple(x.shape[1:]))[self.output]), np.float32)
        with torch.no_grad():
            outs = [
                self.forward(torch.from_numpy(np.asarray(x[i : i + 256], np.float32))).numpy()
                for i in range(0, len(x), 256)
            ]
        return np.concatenate(outs)

    def shapes(self, sample_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Each tensor's per-sample shape for inputs of `sample_shape`."""
        with torch.no_grad():
            values = self.values(torch.zeros((1, *sample_shape)))
        return {name: tuple(value.shape[1:]) for name, value in values.items()}


def _run(graph: Graph, node: Node, function: Callable[..., Any], inputs: list[Any]) -> Any:
    """`function` of a node's inputs; its refusal as NotVerifiable, a shape error as
    InvalidArgument, each naming the node."""
    try:
        return function(*inputs)
    except _Unsupported as exc:
        raise NotVerifiable(graph.model, [(node.kind, node.name, str(exc))]) from None
    except RuntimeError as exc:
        raise InvalidArgument(
            f"{graph.model}: node '{node.name}' ({node.kind}) fails on its input: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------
# Reading ONNX


class _Parse:
    """What reading a graph has found so far: constants, variables and operations."""

    def __init__(self, model: str, constants: dict[str, Array], variables: set[str]) -> None:
        self.model, self.constants, self.variables = model, constants, variables
        self.nodes: list[Node] = []
        self.node: Any = None  # the ONNX node being read

    def refuse(self, why: str) -> NotVerifiable:
        return NotVerifiable(self.model, [(self.node.op_type, _node_name(self.node), why)])

    def inputs(self) -> list[str]:
        return [name for name in self.node.input]

    def constant(self, name: str) -> Array | None:
        return self.constants.get(name) if name else None

    def tensor(self, name: str) -> Tensor:
        value = self.constant(name)
        if value is None:
            raise self.refuse(f"its input '{name}' must be a constant")
        return torch.from_numpy(np.array(value, dtype=np.float32))

    def variable(self, name: str) -> str:
        if name not in self.variables:
            raise self.refuse(f"its input '{name}' must be computed from the graph's input")
        return name

    def attributes(self) -> dict[str, Any]:
        import onnx

        out = {}
        for attribute in self.node.attribute:
            value = onnx.helper.get_attribute_value(attribute)
            out[attribute.name] = value.decode() if isinstance(value, bytes) else value
        return out

    def add(self, op: Op, inputs: Sequence[str], output: str) -> None:
        """The node's operation, reading `inputs`, writing `output`."""
        self.nodes.append(Node(op, tuple(inputs), output, _node_name(self.node), self.node.op_type))
        self.variables.add(output)

    def single_output(self) -> str:
        extra = [name for name in self.node.output[1:] if name]
        if extra:
            raise self.refuse(f"its optional output(s) {extra}")
        return str(self.node.output[0])


def _node_name(node: Any) -> str:
    """An ONNX node's name, or the tensor it writes where it has none."""
    return str(node.name or node.output[0])


def _constant(parse: _Parse) -> None:
    import onnx

    attributes = {a.name: a for a in parse.node.attribute}
    if "value" in attributes:
        value = onnx.numpy_helper.to_array(attributes["value"].t)
    elif {"value_float", "value_floats", "value_int", "value_ints"} & set(attributes):
        (attribute,) = attributes.values()
        value = np.array(onnx.helper.get_attribute_value(attribute))
    else:
        raise parse.refuse(f"a constant of kind {sorted(attributes)}")
    parse.constants[parse.single_output()] = value


def _identity(parse: _Parse) -> None:
    (source,) = parse.inputs()
    value = parse.constant(source)
    if value is not None:
        parse.constants[parse.single_output()] = value
    else:
        parse.add(Identity(), [parse.variable(source)], parse.single_output())


def _pairs(attributes: dict[str, Any], name: str, default: int) -> tuple[int, int]:
    values = list(attributes.get(name, [default, default]))
    return values[0], values[1]


def _pads(parse: _Parse, attributes: dict[str, Any]) -> tuple[int, int, int, int]:
    if attributes.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise parse.refuse(f"auto_pad {attributes['auto_pad']} (export with explicit pads)")
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    if attributes.get("auto_pad") == "VALID":
        pads = [0, 0, 0, 0]
    if len(pads) != 4:
        raise parse.refuse(f"pads {pads}: only 2-D kernels are bounded")
    return pads[0], pads[1], pads[2], pads[3]


def _conv(parse: _Parse) -> None:
    x, w, *rest = parse.inputs()
    weight = parse.tensor(w)
    if weight.dim() != 4:
        raise parse.refuse(f"a {weight.dim() - 2}-D convolution: only 2-D ones are bounded")
    attributes = parse.attributes()
    bias = parse.tensor(rest[0]) if rest and rest[0] else None
    op = Conv(
        weight,
        bias,
        _pairs(attributes, "strides", 1),
        _pads(parse, attributes),
        _pairs(attributes, "dilations", 1),
        int(attributes.get("group", 1)),
    )
    parse.add(op, [parse.variable(x)], parse.single_output())


def _gemm(parse: _Parse) -> None:
    a, b, *rest = parse.inputs()
    attributes = parse.attributes()
    if attributes.get("transA", 0):
        raise parse.refuse("transA on the batch: it mixes samples")
    weight = parse.tensor(b)
    if attributes.get("transB", 0):
        weight = weight.T
    weight = weight * float(attributes.get("alpha", 1.0))
    bias = None
    if rest and rest[0]:
        bias = parse.tensor(rest[0]) * float(attributes.get("beta", 1.0))
        if bias.dim() == 2 and bias.shape[0] != 1:
            raise parse.refuse(f"a bias of shape {list(bias.shape)}: it depends on the batch")
    parse.add(Dense(weight.contiguous(), bias), [parse.variable(a)], parse.single_output())


def _matmul(parse: _Parse) -> None:
    a, b = parse.inputs()
    output = parse.single_output()
    if parse.constant(b) is not None and parse.constant(a) is None:
        weight = parse.tensor(b)
        if weight.dim() != 2:
            raise parse.refuse(f"a constant of shape {list(weight.shape)} (2-D only)")
        parse.add(Dense(weight, None), [parse.variable(a)], output)
    elif parse.constant(a) is not None and parse.constant(b) is None:
        weight = parse.tensor(a)
        if weight.dim() != 2:
            raise parse.refuse(f"a constant of shape {list(weight.shape)} (2-D only)")
        parse.add(LeftMatMul(weight), [parse.variable(b)], output)
    else:
        raise parse.refuse("a product of two tensors (not piecewise linear)")


def _arithmetic(parse: _Parse) -> None:
    """Add, Sub, Mul, Div: of two tensors (Add, Sub) or of a tensor and a constant."""
    kind = parse.node.op_type
    a, b = parse.inputs()
    output = parse.single_output()
    ca, cb = parse.constant(a), parse.constant(b)
    if ca is None and cb is None:
        if kind not in ("Add", "Sub"):
            raise parse.refuse(f"a {kind} of two tensors (not piecewise linear)")
        signs = (1.0, 1.0 if kind == "Add" else -1.0)
        parse.add(Sum(signs), [parse.variable(a), parse.variable(b)], output)
        return
    if ca is not None and cb is not None:
        raise parse.refuse("a constant computation left in the graph (simplify it first)")
    x, c = (b, parse.tensor(a)) if ca is not None else (a, parse.tensor(b))
    one, zero = torch.ones(()), torch.zeros(())
    if kind == "Add":
        scale, shift = one, c
    elif kind == "Sub":
        scale, shift = (-one, c) if ca is not None else (one, -c)
    elif kind == "Mul":
        scale, shift = c, zero
    elif ca is not None:
        raise parse.refuse("a constant divided by a tensor (not piecewise linear)")
    elif bool((c == 0).any()):
        raise parse.refuse("a division by zero")
    else:
        scale, shift = 1 / c, zero
    parse.add(Affine(scale, shift), [parse.variable(x)], output)


def _relu(parse: _Parse) -> None:
    (x,) = parse.inputs()
    alpha = float(parse.attributes().get("alpha", 0.01)) if parse.node.op_type != "Relu" else 0.0
    if not 0.0 <= alpha <= 1.0:
        raise parse.refuse(f"alpha {alpha} outside [0, 1]")
    parse.add(LeakyRelu(alpha), [parse.variable(x)], parse.single_output())


def _clip(parse: _Parse) -> None:
    x, *bounds = parse.inputs()
    attributes = parse.attributes()
    limits: list[float | None] = [attributes.get("min"), attributes.get("max")]
    for i, name in enumerate(bounds[:2]):
        if name:
            value = parse.constant(name)
            if value is None or np.size(value) != 1:
                raise parse.refuse(f"its bound '{name}' must be a scalar constant")
            limits[i] = float(np.asarray(value).reshape(()))
    low, high = (v if v is not None and abs(v) < 1e30 else None for v in limits)
    if low is not None and high is not None and low > high:
        raise parse.refuse(f"min {low} above max {high}")
    op: Op = (
        Identity()
        if low is None and high is None
        else Clip(-math.inf if low is None else low, math.inf if high is None else high)
    )
    parse.add(op, [parse.variable(x)], parse.single_output())


def _batch_norm(parse: _Parse) -> None:
    x, gamma, beta, mean, variance = parse.inputs()
    attributes = parse.attributes()
    if attributes.get("training_mode", 0):
        raise parse.refuse("training mode")
    epsilon = float(attributes.get("epsilon", 1e-5))
    scale = parse.tensor(gamma) / torch.sqrt(parse.tensor(variance) + epsilon)
    shift = parse.tensor(beta) - parse.tensor(mean) * scale
    parse.add(Affine(scale, shift, per_channel=True), [parse.variable(x)], parse.single_output())


def _window(parse: _Parse, attributes: dict[str, Any]) -> Window:
    kernel = list(attributes.get("kernel_shape", []))
    if len(kernel) != 2:
        raise parse.refuse(f"kernel {kernel}: only 2-D pooling is bounded")
    return Window(
        (kernel[0], kernel[1]),
        _pairs(attributes, "strides", 1),
        _pads(parse, attributes),
        _pairs(attributes, "dilations", 1),
        bool(attributes.get("ceil_mode", 0)),
    )


def _max_pool(parse: _Parse) -> None:
    (x,) = parse.inputs()
    op = MaxPool(_window(parse, parse.attributes()))
    parse.add(op, [parse.variable(x)], parse.single_output())


def _average_pool(parse: _Parse) -> None:
    (x,) = parse.inputs()
    attributes = parse.attributes()
    window = _window(parse, attributes)
    if window.dilations != (1, 1):
        raise parse.refuse(f"dilations {list(window.dilations)}")
    op = AveragePool(window, bool(attributes.get("count_include_pad", 0)))
    parse.add(op, [parse.variable(x)], parse.single_output())


def _global_average_pool(parse: _Parse) -> None:
    (x,) = parse.inputs()
    parse.add(GlobalAveragePool(), [parse.variable(x)], parse.single_output())


def _flatten(parse: _Parse) -> None:
    (x,) = parse.inputs()
    axis = int(parse.attributes().get("axis", 1))
    parse.add(Flatten(axis), [parse.variable(x)], parse.single_output())


def _reshape(parse: _Parse) -> None:
    x, shape = parse.inputs()
    value = parse.constant(shape)
    if value is None:
        raise parse.refuse("a shape computed at run time (simplify the model first)")
    allowzero = bool(parse.attributes().get("allowzero", 0))
    op = Reshape(tuple(int(v) for v in np.asarray(value).reshape(-1)), allowzero)
    parse.add(op, [parse.variable(x)], parse.single_output())


PARSERS: dict[str, Callable[[_Parse], None]] = {
    "Constant": _constant,
    "Identity": _identity,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _arithmetic,
    "Sub": _arithmetic,
    "Mul": _arithmetic,
    "Div": _arithmetic,
    "Relu": _relu,
    "LeakyRelu": _relu,
    "Clip": _clip,
    "BatchNormalization": _batch_norm,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "Flatten": _flatten,
    "Reshape": _reshape,
}


def load_graph(path: str | Path) -> Graph:
    """The ONNX model at `path` as a Graph; NotVerifiable (an InvalidArgument) names every
    operator the verifier cannot bound, InvalidArgument says what else is wrong."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except (DecodeError, OSError, ValueError) as exc:
        raise InvalidArgument(f"{path} is not an ONNX model: {exc}") from exc
    graph = model.graph
    refused = [
        (node.op_type if not node.domain else f"{node.domain}.{node.op_type}", _node_name(node), "")
        for node in graph.node
        if node.domain not in ("", "ai.onnx") or node.op_type not in PARSERS
    ]
    if refused:
        raise NotVerifiable(path.name, refused)
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    source = _graph_input(path, graph, constants)
    if len(graph.output) != 1:
        raise InvalidArgument(
            f"{path.name}: a classifier has one output, this has {len(graph.output)}"
        )
    parse = _Parse(path.name, constants, {source.name})
    for node in _topological(path, graph, set(constants) | {source.name}):
        parse.node = node
        PARSERS[node.op_type](parse)
    output = graph.output[0].name
    if output not in parse.variables:
        raise InvalidArgument(f"{path.name}: its output '{output}' does not depend on its input")
    result = Graph(path.name, source.name, output, _sample_shape(source), _needed(parse, output))
    if result.sample_shape is not None:
        result.shapes(result.sample_shape)  # every operation accepts what it is given
    return result


def _graph_input(path: Path, graph: Any, constants: dict[str, Array]) -> Any:
    import onnx

    inputs = [value for value in graph.input if value.name not in constants]
    if len(inputs) != 1:
        raise InvalidArgument(f"{path.name}: a classifier has one input, this has {len(inputs)}")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise InvalidArgument(f"{path.name}: its input '{inputs[0].name}' is not float32")
    return inputs[0]


def _sample_shape(source: Any) -> tuple[int, ...] | None:
    dims = source.type.tensor_type.shape.dim[1:]
    if not all(dim.HasField("dim_value") and dim.dim_value > 0 for dim in dims):
        return None
    return tuple(int(dim.dim_value) for dim in dims)


def _topological(path: Path, graph: Any, available: set[str]) -> list[Any]:
    """The nodes in an order where each comes after what it reads."""
    pending, ordered, known = list(graph.node), [], set(available) | {""}
    while pending:
        ready = [node for node in pending if all(name in known for name in node.input)]
        if not ready:
            names = sorted({name for node in pending for name in node.input} - known)
            raise InvalidArgument(f"{path.name}: tensors {names[:5]} are never computed")
        for node in ready:
            known.update(node.output)
        ordered += ready
        pending = [node for node in pending if node not in ready]
    return ordered


def _needed(parse: _Parse, output: str) -> tuple[Node, ...]:
    """The operations the output depends on, in order."""
    wanted, kept = {output}, []
    for node in reversed(parse.nodes):
        if node.output in wanted:
            kept.append(node)
            wanted.update(node.inputs)
    return tuple(reversed(kept))


# ---------------------------------------------------------------------------------------
# Bounds


class _Bounder:
    """Bounds of every tensor of the graph over a box of inputs (one batch), and the
    relaxations of its nonlinear operations, computed in topological order."""

    def __init__(self, graph: Graph, lower: Tensor, upper: Tensor, method: Method) -> None:
        self.graph, self.lower, self.upper = graph, lower, upper
        self.shapes = graph.shapes(tuple(lower.shape[1:]))
        self.rows_per_chunk = max(
            1, ROW_ELEMENTS // max(math.prod(s) for s in self.shapes.values())
        )
        self.boxes: dict[str, Box] = {graph.input: (lower, upper)}
        self.relaxations: dict[str, Any] = {}
        self.position = {node.output: i for i, node in enumerate(graph.nodes)}
        consumers: dict[str, list[Node]] = {}
        for node in graph.nodes:
            for name in node.inputs:
                consumers.setdefault(name, []).append(node)
        self.consumers = consumers
        tight = {graph.input}  # tensors whose box CROWN would not tighten
        for node in graph.nodes:
            box = _run(graph, node, node.op.interval, [self.boxes[i] for i in node.inputs])
            if self._tight(node, tight):
                tight.add(node.output)
            elif method == "crown" and self._feeds_nonlinearity(node.output):
                box = self._refine(node.output, box)
                tight.add(node.output)
            self.boxes[node.output] = box
            if node.op.nonlinear:
                box = self.boxes[node.inputs[0]]
                self.relaxations[node.output] = _run(graph, node, node.op.relax, list(box))

    def _tight(self, node: Node, tight: set[str]) -> bool:
        """Whether IBP bounds the node's output as CROWN would: an elementwise function or
        a reshape of tight boxes, or an affine map of the input box itself."""
        op = node.op
        if isinstance(op, Linear) and not op.exact:
            return list(node.inputs) == [self.graph.input]
        return all(name in tight for name in node.inputs)

    def _feeds_nonlinearity(self, name: str) -> bool:
        return any(user.op.nonlinear for user in self.consumers.get(name, []))

    def _refine(self, name: str, box: Box) -> Box:
        """The box of tensor `name` tightened by CROWN where a nonlinearity that reads it
        would gain: both bounds of each such element, by back-substitution."""
        lower, upper = box[0].clone(), box[1].clone()
        wanted = torch.zeros_like(lower, dtype=torch.bool)
        for user in self.consumers[name]:
            if user.op.nonlinear:
                wanted |= user.op.unstable(lower, upper)
        sample, element = wanted.flatten(1).nonzero(as_tuple=True)
        flat_lower, flat_upper = lower.view(lower.shape[0], -1), upper.view(upper.shape[0], -1)
        step = self.rows_per_chunk
        for start in range(0, len(sample), step):
            owner, chosen = sample[start : start + step], element[start : start + step]
            rows = _one_hot(chosen, self.shapes[name], lower.dtype)
            found = self.lower_bound(name, rows, owner.repeat(2))
            count = len(owner)
            flat_lower[owner, chosen] = torch.maximum(flat_lower[owner, chosen], found[:count])
            flat_upper[owner, chosen] = torch.minimum(flat_upper[owner, chosen], -found[count:])
        return lower, upper

    def lower_bound(self, name: str, rows: Coefficients, owner: Tensor) -> Tensor:
        """CROWN's lower bound of each row's inner product with tensor `name` (rows[i] is
        for sample owner[i]), by back-substitution to the input box."""
        coefficients = {name: rows}
        constant = torch.zeros(rows.values.shape[0], dtype=rows.values.dtype)
        last = self.position.get(name, -1)
        for node in reversed(self.graph.nodes[: last + 1]):
            found = coefficients.pop(node.output, None)
            if found is None:
                continue
            shapes = [self.shapes[i] for i in node.inputs]
            relaxation = self.relaxations.get(node.output)
            parts, offset = node.op.substitute(
                found, owner, relaxation, shapes, self.shapes[node.output]
            )
            if offset is not None:
                constant = constant + offset
            for source, part in zip(node.inputs, parts, strict=True):
                known = coefficients.get(source)
                coefficients[source] = (
                    part if known is None else _merge(known, part, self.shapes[source])
                )
        on_input = coefficients.get(self.graph.input)
        if on_input is None:
            return constant
        low, high = on_input.gather(self.lower, owner), on_input.gather(self.upper, owner)
        values = on_input.values
        return constant + _dot(values.clamp(min=0), low) + _dot(values.clamp(max=0), high)

    def output_lower_bound(self, rows: Tensor, owner: Tensor, method: Method) -> Tensor:
        """The lower bound of rows · logits: CROWN's (chunked) intersected with IBP's, or
        IBP's alone."""
        low, high = self.boxes[self.graph.output]
        interval = _dot(rows.clamp(min=0), low[owner]) + _dot(rows.clamp(max=0), high[owner])
        if method == "ibp":
            return interval
        parts = [
            self.lower_bound(
                self.graph.output,
                Coefficients(rows[i : i + self.rows_per_chunk]),
                owner[i : i + self.rows_per_chunk],
            )
            for i in range(0, rows.shape[0], self.rows_per_chunk)
        ]
        return torch.maximum(interval, torch.cat(parts))


def _one_hot(elements: Tensor, shape: Shape, dtype: torch.dtype) -> Coefficients:
    """Rows +e_k then -e_k for each flat element index k of a tensor of `shape`: a
    1x1 window at the element's position on a [C, H, W] tensor, else dense."""
    count = len(elements)
    if len(shape) == 3:
        channel, position = elements // (shape[1] * shape[2]), elements % (shape[1] * shape[2])
        values = torch.zeros((2 * count, shape[0], 1, 1), dtype=dtype)
        values[torch.arange(count), channel] = 1.0
        values[torch.arange(count, 2 * count), channel] = -1.0
        origin = torch.stack([position // shape[2], position % shape[2]], dim=1)
        return Coefficients(values, origin.repeat(2, 1))
    values = torch.zeros((2 * count, math.prod(shape)), dtype=dtype)
    values[torch.arange(count), elements] = 1.0
    values[torch.arange(count, 2 * count), elements] = -1.0
    return Coefficients(values.view(2 * count, *shape))


def _method(method: str) -> Method:
    if method not in METHODS:
        raise InvalidArgument(f"unknown bounding method {method!r}; choose from {list(METHODS)}")
    return method


def _box(x: Tensor, eps: Bound, lower: Bound | None, upper: Bound | None) -> Box:
    """[x - eps, x + eps] within the valid range [lower, upper] (and holding x)."""
    radius = _radius(eps)
    low, high = x - radius, x + radius
    if lower is not None:
        low = torch.maximum(low, torch.as_tensor(np.asarray(lower, np.float32)))
    if upper is not None:
        high = torch.minimum(high, torch.as_tensor(np.asarray(upper, np.float32)))
    return torch.minimum(low, x), torch.maximum(high, x)


def _radius(eps: Bound) -> Tensor:
    radius = torch.as_tensor(np.asarray(eps, np.float32))
    if not bool(torch.isfinite(radius).all()) or bool((radius < 0).any()):
        raise InvalidArgument(f"eps must not be negative (nor infinite), got {eps}")
    return radius


def _batch(x: Array, start: int) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x[start : start + BATCH], dtype=np.float32))


def bounds(
    graph: Graph,
    x: Array,
    eps: Bound,
    method: str = DEFAULT_METHOD,
    *,
    lower: Bound | None = None,
    upper: Bound | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Lower and upper bounds of each logit over the box [x - eps, x + eps] ∩ [lower, upper]
    around each input of the batch `x` (eps and the range in the model's input units)."""
    chosen = _method(method)
    lows, highs = [], []
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            box = _box(_batch(x, start), eps, lower, upper)
            bounder = _Bounder(graph, *box, chosen)
            classes = math.prod(bounder.shapes[graph.output])
            samples = box[0].shape[0]
            eye = torch.eye(classes).repeat(samples, 1)
            rows = torch.cat([eye, -eye]).view(2 * samples * classes, *bounder.shapes[graph.output])
            owner = torch.arange(samples).repeat_interleave(classes).repeat(2)
            found = bounder.output_lower_bound(rows, owner, chosen).view(2, samples, classes)
            shape = (samples, *bounder.shapes[graph.output])
            lows.append(found[0].reshape(shape).numpy())
            highs.append((-found[1]).reshape(shape).numpy())
    return np.concatenate(lows), np.concatenate(highs)


def margins(
    graph: Graph,
    x: Array,
    labels: Array,
    eps: Bound,
    method: str = DEFAULT_METHOD,
    *,
    lower: Bound | None = None,
    upper: Bound | None = None,
) -> npt.NDArray[np.float32]:
    """[N, classes]: the lower bound of logit_label - logit_j over each input's box, for
    every class j (+inf at j = label)."""
    chosen = _method(method)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            box = _box(_batch(x, start), eps, lower, upper)
            label = torch.as_tensor(np.asarray(labels[start : start + BATCH], np.int64))
            out.append(_margins(graph, box, label, chosen).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _margins(graph: Graph, box: Box, labels: Tensor, method: Method) -> Tensor:
    bounder = _Bounder(graph, *box, method)
    classes = math.prod(bounder.shapes[graph.output])
    samples = box[0].shape[0]
    if bool(((labels < 0) | (labels >= classes)).any()):
        raise InvalidArgument(f"labels must lie in [0, {classes}) for {graph.model}")
    rows = -torch.eye(classes).repeat(samples, 1)  # row (n, j): logit_label(n) - logit_j
    owner = torch.arange(samples).repeat_interleave(classes)
    rows[torch.arange(samples * classes), labels[owner]] += 1.0
    found = bounder.output_lower_bound(rows.view(-1, *bounder.shapes[graph.output]), owner, method)
    found = found.view(samples, classes)
    found[torch.arange(samples), labels] = math.inf
    return found


def certify(
    graph: Graph,
    x: Array,
    labels: Array,
    eps: Bound,
    method: str = DEFAULT_METHOD,
    *,
    lower: Bound | None = None,
    upper: Bound | None = None,
) -> npt.NDArray[np.bool_]:
    """For each input: whether the model classifies it as its label and no point of its box
    [x - eps, x + eps] ∩ [lower, upper] changes that (input units). Only correctly
    classified inputs are bounded."""
    chosen = _method(method)
    _radius(eps)
    labels, correct = _correct(graph, x, labels)
    certified = np.zeros(len(x), dtype=bool)
    todo = np.flatnonzero(correct)
    with torch.no_grad():
        for start in range(0, len(todo), BATCH):
            chosen_rows = todo[start : start + BATCH]
            box = _box(torch.from_numpy(np.asarray(x[chosen_rows], np.float32)), eps, lower, upper)
            found = _certified(graph, box, torch.from_numpy(labels[chosen_rows]), chosen)
            certified[chosen_rows] = found.numpy()
    return certified


def _correct(
    graph: Graph, x: Array, labels: Array
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """The labels, checked, and where the model predicts them."""
    labels = np.asarray(labels, np.int64)
    logits = _rows(graph(x))
    if labels.shape != (len(x),) or ((labels < 0) | (labels >= logits.shape[1])).any():
        raise InvalidArgument(
            f"labels must lie in [0, {logits.shape[1]}) for {graph.model}, one per input"
        )
    return labels, logits.argmax(1) == labels


def _certified(graph: Graph, box: Box, labels: Tensor, method: Method) -> Tensor:
    """Whether every margin's lower bound is positive. CROWN tries CROWN-IBP first: both
    are sound, so either's certificate holds, and the cheap one often suffices."""
    if method != "crown":
        return (_margins(graph, box, labels, method) > 0).all(1)
    certified = _certified(graph, box, labels, "crown-ibp")
    rest = ~certified
    if bool(rest.any()):
        rest_box = (box[0][rest], box[1][rest])
        certified[rest] = (_margins(graph, rest_box, labels[rest], "crown") > 0).all(1)
    return certified


@dataclass(frozen=True)
class Domain:
    """How pixel perturbations read in a model's input units: ε on the [0, 1] pixel scale
    times `unit`, and the valid range of the inputs, each [1, C, 1, 1]."""

    unit: npt.NDArray[np.float32]
    lower: npt.NDArray[np.float32]
    upper: npt.NDArray[np.float32]

    def epsilon(self, eps: float) -> npt.NDArray[np.float32]:
        return np.asarray(self.unit * np.float32(eps), np.float32)


def input_domain(preprocessing: Preprocessing) -> Domain:
    """The domain of an image model whose preprocessing normalizes pixels on the [0, 1]
    scale as (p - mean) / std: ε becomes ε / std, and [0, 1] becomes [-mean/std,
    (1 - mean)/std]. (Resizing and grayscale conversion average pixels, so an L∞ ball of
    pixels stays within the ball of the inputs.)"""
    if preprocessing.kind != "image":
        raise InvalidArgument("a pixel ε needs an image model; this preprocessing takes rows")
    mean = np.array(preprocessing.mean, np.float32)[None, :, None, None]
    std = np.array(preprocessing.std, np.float32)[None, :, None, None]
    return Domain(
        np.asarray(1 / std, np.float32),
        np.asarray((0 - mean) / std, np.float32),
        np.asarray((1 - mean) / std, np.float32),
    )


def certified_fraction(
    model: Graph | str | Path,
    x: Array,
    labels: Array,
    epsilons: Sequence[float],
    method: str = DEFAULT_METHOD,
    *,
    lower: Bound | None = None,
    upper: Bound | None = None,
    unit: Bound = 1.0,
) -> dict[str, dict[str, Any]]:
    """Per ε (keyed "{eps:g}"): samples, correct, certified, certified_fraction (of the
    samples), method and seconds; each ε is `eps * unit` in input units (`unit` from
    input_domain turns pixel ε into input units). JSON-serializable."""
    chosen = _method(method)
    graph = model if isinstance(model, Graph) else load_graph(model)
    labels, predicted = _correct(graph, x, labels)
    correct = int(predicted.sum())
    result = {}
    for eps in epsilons:
        began = time.perf_counter()
        radius = np.asarray(unit, np.float32) * np.float32(eps)
        certified = int(certify(graph, x, labels, radius, chosen, lower=lower, upper=upper).sum())
        result[f"{eps:g}"] = {
            "eps": float(eps),
            "method": chosen,
            "samples": len(x),
            "correct": correct,
            "certified": certified,
            "certified_fraction": certified / len(x) if len(x) else 0.0,
            "seconds": round(time.perf_counter() - began, 3),
        }
    return result


def certify_test_set(
    path: Path, tests: Holdout, epsilons: Sequence[float], method: str = DEFAULT_METHOD
) -> dict[str, dict[str, Any]]:
    """certified_fraction of the ONNX model at `path` on the labelled images of `tests`,
    each ε on the [0, 1] pixel scale, the box kept within the valid pixel range."""
    if path.suffix != ".onnx":
        raise InvalidArgument(
            f"{path.name} is not verifiable: the formal verifier bounds ONNX graphs; verify "
            "the ONNX model it was converted from"
        )
    if tests.labels is None:
        raise InvalidArgument("certification needs labelled test samples")
    domain = input_domain(tests.preprocessing)
    return certified_fraction(
        load_graph(path),
        tests.inputs(),
        tests.labels,
        epsilons,
        method,
        lower=domain.lower,
        upper=domain.upper,
        unit=domain.unit,
    )


# ---------------------------------------------------------------------------------------
# The attack


@dataclass(frozen=True)
class Attack:
    """What PGD found: the point of each input's box it ended at (its first flip, where it
    found one), and whether the prediction there is not the label."""

    adversarial: npt.NDArray[np.float32]
    flipped: npt.NDArray[np.bool_]


def pgd_attack(
    model: Graph | str | Path,
    x: Array,
    labels: Array,
    eps: Bound,
    *,
    steps: int = 40,
    step_size: Bound | None = None,
    restarts: int = 3,
    lower: Bound | None = None,
    upper: Bound | None = None,
    seed: int = 0,
    judge: Callable[[npt.NDArray[np.float32]], Array] | None = None,
) -> Attack:
    """Projected gradient ascent of the margin max_j logit_j - logit_label from random
    starts in each input's box [x - eps, x + eps] ∩ [lower, upper], on the graph in torch;
    an input stops at its first flip. `judge` (inputs to logits: the served runtime, e.g.
    kapi.verifier.artifact.runner) decides the flips where given, else the graph."""
    if steps < 1 or restarts < 1:
        raise InvalidArgument(f"PGD needs steps >= 1 and restarts >= 1, not {steps}, {restarts}")
    graph = model if isinstance(model, Graph) else load_graph(model)
    step = 2.5 * np.asarray(eps, np.float32) / steps if step_size is None else step_size
    generator = torch.Generator().manual_seed(seed)
    found = []
    for start in range(0, len(x), BATCH * 4):
        xs = torch.from_numpy(np.ascontiguousarray(x[start : start + BATCH * 4], np.float32))
        ys = torch.as_tensor(np.asarray(labels[start : start + BATCH * 4], np.int64))
        box = _box(xs, eps, lower, upper)
        found.append(_pgd(graph, xs, ys, box, steps, step, restarts, generator).numpy())
    adversarial = np.concatenate(found) if found else np.asarray(x, np.float32)
    logits = judge(adversarial) if judge is not None else graph(adversarial)
    return Attack(adversarial, _rows(np.asarray(logits)).argmax(1) != np.asarray(labels))


def _rows(logits: Array) -> Array:
    """[N, classes], also for N = 0."""
    return logits.reshape(len(logits), math.prod(logits.shape[1:]))


def _pgd(
    graph: Graph,
    x: Tensor,
    labels: Tensor,
    box: Box,
    steps: int,
    step: Bound,
    restarts: int,
    generator: torch.Generator,
) -> Tensor:
    low, high = box
    size = torch.as_tensor(np.asarray(step, np.float32))
    best, done = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for _ in range(restarts):
        point = low + (high - low) * torch.rand(x.shape, generator=generator)
        for step_number in range(steps + 1):
            point = point.detach().requires_grad_(True)
            margin = _attack_margin(graph.forward(point), labels)
            with torch.no_grad():
                flips = (margin > 0) & ~done
                best[flips], done = point[flips], done | flips
            if bool(done.all()):
                return best
            if step_number == steps:
                break
            (grad,) = torch.autograd.grad(margin.sum(), point)
            with torch.no_grad():
                point = torch.minimum(torch.maximum(point + size * grad.sign(), low), high)
        with torch.no_grad():
            best[~done] = point[~done].detach()  # the last point where nothing flipped
    return best


def _attack_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """max over j != label of logit_j - logit_label: positive where the prediction flips."""
    logits = logits.reshape(len(labels), -1)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -math.inf)
    return others.amax(1) - own
