"""The trainer's model zoo: image classifiers chosen by name, for any input size, channel
count and class count, scaled by width and depth multipliers.

    model = build("mobilenet_v2", in_channels=1, num_classes=10, width=0.5)
"""

from __future__ import annotations

from kapi.core.errors import MissingExtra

try:
    import torch  # noqa: F401 - the whole zoo is PyTorch
except ImportError as exc:  # pragma: no cover - depends on the image
    raise MissingExtra("torch", "trainer") from exc

# Importing an architecture's module registers it.
from kapi.trainer.models._efficientnet_b0 import EfficientNetB0
from kapi.trainer.models._mobilenet_v2 import MobileNetV2
from kapi.trainer.models._registry import build, names, options, register
from kapi.trainer.models._resnet18 import ResNet18
from kapi.trainer.models._small_cnn import SmallCNN

__all__ = [
    "EfficientNetB0",
    "MobileNetV2",
    "ResNet18",
    "SmallCNN",
    "build",
    "names",
    "options",
    "register",
]
