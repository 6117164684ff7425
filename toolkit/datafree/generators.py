"""Class-conditional generators of teacher-shaped images, and the loss that trains them.

A generator maps latent noise ``z`` (100 numbers) and a class label to an image. Trained with
:func:`reconstruction_loss` against a frozen teacher, it learns to produce images the teacher
assigns to the requested class and whose internal statistics match the teacher's batch-norm
running statistics: data for distilling a student when the real data is gone.

:class:`GDFQGenerator` is GDFQ's hand-designed generator (Xu et al., ECCV 2020, the
``Generator`` of its public code), kept as the baseline: the label's embedding multiplies the
noise, a linear layer makes a ``128 x s/4 x s/4`` map, two nearest-neighbour upsamplings with
3x3 convs, batch norm and LeakyReLU(0.2) bring it to ``s x s``, and ``tanh`` followed by a batch
norm without affine parameters makes every channel of a batch zero-mean and unit-variance,
like the normalised images the teacher was trained on. The public code's ``eps=0.8`` in the two
inner batch norms (the second positional argument of ``BatchNorm2d``) is kept as it is.
:mod:`toolkit.datafree.autorecon` builds searched generators with the same interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LATENT_DIM",
    "ConditionalGenerator",
    "GDFQGenerator",
    "reconstruction_loss",
]

#: Size of the latent noise, as in GDFQ and AutoReCon.
LATENT_DIM = 100


class ConditionalGenerator(nn.Module):
    """What every generator here shares: ``forward(z, labels)`` and :meth:`sample`.

    Args:
        num_classes: classes of the teacher.
        image_size: side of the square images.
        channels: image channels.
        latent_dim: size of the noise vector.
    """

    def __init__(self, num_classes: int, image_size: int, channels: int, latent_dim: int) -> None:
        super().__init__()
        if num_classes < 1 or image_size < 4 or channels < 1 or latent_dim < 1:
            raise ValueError(
                "a generator needs num_classes, channels, latent_dim >= 1 and image_size >= 4, "
                f"got {num_classes}, {channels}, {latent_dim}, {image_size}"
            )
        self.num_classes, self.image_size = num_classes, image_size
        self.channels, self.latent_dim = channels, latent_dim

    def sample(self, count: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``count`` images of uniformly drawn classes, and those classes (labels).

        Gradients flow into the generator unless the caller disables them.
        """
        labels = torch.randint(0, self.num_classes, (count,), generator=generator)
        z = torch.randn(count, self.latent_dim, generator=generator)
        return self(z, labels), labels

    def fit_size(self, x: Tensor) -> Tensor:
        """Resize the last map to ``image_size`` when the upsamplings do not land on it."""
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear")
        return x


class GDFQGenerator(ConditionalGenerator):
    """GDFQ's hand-designed generator (the baseline); see the module doc."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = LATENT_DIM,
        width: int = 128,
    ) -> None:
        super().__init__(num_classes, image_size, channels, latent_dim)
        self.init_size = max(1, -(-image_size // 4))
        self.label_embedding = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(latent_dim, width * self.init_size**2)
        self.width = width
        self.bn0 = nn.BatchNorm2d(width)
        self.block1 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        h = self.project(self.label_embedding(labels) * z)
        h = self.bn0(h.view(len(z), self.width, self.init_size, self.init_size))
        h = self.block1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.fit_size(self.block2(h))


def reconstruction_loss(
    logits: Tensor, labels: Tensor, bn_loss: Tensor | None, bn_weight: float = 0.1
) -> Tensor:
    """GDFQ's generator loss: cross-entropy toward the requested classes + ``bn_weight`` x BNS.

    ``bn_loss`` is the teacher's :meth:`BNStatistics.loss` on the same images, or None for a
    teacher without batch norm (the cross-entropy alone then trains the generator).
    """
    loss = F.cross_entropy(logits, labels)
    if bn_loss is not None:
        loss = loss + bn_weight * bn_loss
    return loss
