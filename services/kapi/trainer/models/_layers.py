"""Building blocks the architectures share: scaling rules, conv-BN-activation, initialization."""

from __future__ import annotations

import math

import torch
from torch import nn

from kapi.core.errors import InvalidArgument

DIVISOR = 8  # channel counts stay multiples of 8: what tensor cores and int8 kernels want


def make_divisible(value: float, divisor: int = DIVISOR) -> int:
    """`value` rounded to the nearest multiple of `divisor`, at least `divisor`, and never
    more than 10% below `value` (the rule of the MobileNet and EfficientNet references)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def scale_channels(channels: int, width: float) -> int:
    """A stage's channel count under the width multiplier."""
    return make_divisible(channels * width)


def scale_repeats(repeats: int, depth: float) -> int:
    """A stage's block count under the depth multiplier: rounded up, at least one."""
    # Rounded first so that a product meant to be whole (10 * 0.3) is not pushed up by one.
    return max(1, math.ceil(round(repeats * depth, 9)))


def require_probability(name: str, value: float) -> float:
    """`value` if it is a drop probability in [0, 1), else InvalidArgument naming `name`."""
    if not 0.0 <= value < 1.0:
        raise InvalidArgument(f"{name} must be in [0, 1), got {value}")
    return value


class ConvBNAct(nn.Sequential):
    """Convolution (no bias, 'same' padding), batch norm, then `activation` unless None."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                groups=groups, bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]  # fmt: skip
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample while training, identity in eval."""

    def __init__(self, probability: float) -> None:
        super().__init__()
        self.probability = require_probability("drop_path_rate", probability)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.probability == 0.0:
            return x
        keep = 1.0 - self.probability
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return x * mask / keep


def classifier(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Global average pooling, so that any input size works, then dropout and a linear layer."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Dropout(require_probability("dropout", dropout)),
        nn.Linear(in_features, num_classes),
    )


def init_weights(model: nn.Module) -> None:
    """He initialization for convolutions, unit batch norms, small normal linear weights
    (the initialization of the reference implementations)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
