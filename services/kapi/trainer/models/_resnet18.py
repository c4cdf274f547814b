"""ResNet-18 (He et al., 2016): BasicBlocks in four stages of [2, 2, 2, 2].

Stage widths are 64, 128, 256, 512 times `width` (multiples of 8); `depth` scales the blocks
per stage (rounded up, at least one). The stem depends on `input_size`, the side of the
images it is built for: above 64 px it is ImageNet's 7x7/2 convolution and 3x3/2 max-pool;
at 64 px or less it is a 3x3/1 convolution without the pool, as in the paper's CIFAR
networks, because the ImageNet stem would shrink a 32 px image to 8 px before the first
stage and throw most of a small image away. Either stem takes inputs of any size.
"""

from __future__ import annotations

import torch
from torch import nn

from kapi.core.errors import InvalidArgument
from kapi.trainer.models._layers import (
    ConvBNAct,
    classifier,
    init_weights,
    scale_channels,
    scale_repeats,
)
from kapi.trainer.models._registry import register

STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
SMALL_INPUT = 64  # the largest side that gets the small-image stem


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut; a strided 1x1 projection where shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            ConvBNAct(in_channels, out_channels, stride=stride),
            ConvBNAct(out_channels, out_channels, activation=None),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvBNAct(in_channels, out_channels, 1, stride=stride, activation=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.block(x) + self.shortcut(x))
        return out


def stem(in_channels: int, out_channels: int, input_size: int) -> nn.Sequential:
    """The small-image stem at `input_size` <= 64 px, else ImageNet's (see the module doc)."""
    if input_size <= SMALL_INPUT:
        return nn.Sequential(ConvBNAct(in_channels, out_channels))
    return nn.Sequential(
        ConvBNAct(in_channels, out_channels, 7, stride=2),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


@register("resnet18")
class ResNet18(nn.Module):
    """ResNet-18 for `in_channels`-channel images of any size; the stem fits `input_size`."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        depth: float = 1.0,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise InvalidArgument(f"input_size must be an integer >= 1, got {input_size!r}")
        channels = scale_channels(STAGE_CHANNELS[0], width)
        layers: list[nn.Module] = [stem(in_channels, channels, input_size)]
        for stage, base in enumerate(STAGE_CHANNELS):
            out_channels = scale_channels(base, width)
            for block in range(scale_repeats(BLOCKS_PER_STAGE, depth)):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = classifier(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
