"""A small CNN for digits: 28x28 MNIST-like and 8x8 scikit-learn-like grayscale images.

Three blocks of conv-BN-ReLU then a 2x2 max-pool, global average pooling and a linear layer.
The pools round up (`ceil_mode`), so a side of 1 stays 1: an 8x8 image ends at 1x1 and even
smaller inputs still work. `depth` scales the convolutions per block (one at depth 1).
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

CHANNELS = (32, 64, 128)


@register("small_cnn")
class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels at width 1) and a linear classifier."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        convs_per_block = scale_repeats(1, depth)
        blocks: list[nn.Module] = []
        channels = in_channels
        for base in CHANNELS:
            out_channels = scale_channels(base, width)
            for _ in range(convs_per_block):
                blocks.append(ConvBNAct(channels, out_channels))
                channels = out_channels
            blocks.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*blocks)
        self.classifier = classifier(channels, num_classes, dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
