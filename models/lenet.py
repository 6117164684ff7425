"""LeNet-5, the small CNN of the vanishing-variance gossip-learning experiments.

Layout (LeCun et al. 1998, with ReLU and max-pooling as in modern re-implementations and in the
gossip paper's code): conv5x5(6) -> pool -> conv5x5(16) -> pool -> fc120 -> fc84 -> fc(classes).
With 32x32 inputs the convolutions need no padding (the classic setting); with 28x28 MNIST the
first conv pads by 2, so both sizes reach the same 16x5x5 feature map.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5 for ``image_size`` x ``image_size`` inputs (28 or 32 give the classic 16x5x5)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> None:
        super().__init__()
        if image_size < 12:
            raise ValueError(f"LeNet-5 needs images of at least 12x12 pixels, not {image_size}")
        padding = 2 if image_size < 32 else 0
        after_conv1 = (image_size + 2 * padding - 4) // 2
        after_conv2 = (after_conv1 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * after_conv2 * after_conv2, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model(family="lenet")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> LeNet5:
    """LeNet-5 (float), the gossip-learning paper's model (62k parameters at 32x32)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
