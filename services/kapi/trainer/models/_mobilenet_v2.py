"""MobileNetV2 (Sandler et al., 2018): inverted residuals with linear bottlenecks.

The paper's stage table, with channels scaled by `width` (multiples of 8) and repeats by
`depth` (rounded up). The last 1x1 convolution keeps 1280 channels below width 1, as in the
paper. The stem's stride and the strided stages pad, so inputs down to 1x1 stay at least 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from kapi.trainer.models._layers import (
    ConvBNAct,
    classifier,
    init_weights,
    scale_channels,
    scale_repeats,
)
from kapi.trainer.models._registry import register

STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# expansion t, output channels c, repeats n, first stride s (the paper's Table 2)
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; a shortcut where shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden, activation=nn.ReLU6),
            ConvBNAct(hidden, out_channels, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return x + out if self.residual else out


@register("mobilenet_v2")
class MobileNetV2(nn.Module):
    """MobileNetV2 for `in_channels`-channel images of any size."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        channels = scale_channels(STEM_CHANNELS, width)
        layers: list[nn.Module] = [ConvBNAct(in_channels, channels, stride=2, activation=nn.ReLU6)]
        for expansion, base, repeats, stride in STAGES:
            out_channels = scale_channels(base, width)
            for index in range(scale_repeats(repeats, depth)):
                block_stride = stride if index == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, block_stride, expansion))
                channels = out_channels
        last_channels = scale_channels(LAST_CHANNELS, max(1.0, width))
        layers.append(ConvBNAct(channels, last_channels, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier(last_channels, num_classes, dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
