"""Discriminators and GAN losses for general activation matching (GAM stage 3).

One discriminator per matched layer tells activations of the source network on source images
("real", label 1) from activations of the target network on target images ("fake", label 0).
Plain torch only: no optimisation and no Lightning here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dam_lightning.errors import ConfigError

GANKind = Literal["vanilla", "lsgan"]


class MLPDiscriminator(nn.Module):
    """Discriminator for vector activations (N, C): C -> hidden -> hidden -> 1 logit, ReLU between.

    The paper's digits code uses 500-500 hidden units with ReLU. One output logit is the
    two-class softmax of the official code with the redundant logit removed.

    Example:
        >>> d = MLPDiscriminator(10)
        >>> d(torch.zeros(4, 10)).shape
        torch.Size([4, 1])
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (500, 500)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, activation: Tensor) -> Tensor:
        return self.net(activation.flatten(1))


class PatchDiscriminator(nn.Module):
    """Fully-convolutional discriminator for feature maps (N, C, H, W): one logit per patch.

    4x4 stride-2 convolutions with LeakyReLU(0.2) halve the map while it is at least
    ``min_size`` on its short side; after that 3x3 stride-1 convolutions keep the size, so
    small maps (LeNet's 4x4) and large ones (ERFNet's 64x128) both work.

    Example:
        >>> d = PatchDiscriminator(50, spatial_size=(4, 4))
        >>> d(torch.zeros(2, 50, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        spatial_size: tuple[int, int],
        width: int = 64,
        depth: int = 3,
        min_size: int = 8,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, min(spatial_size)
        for i in range(depth):
            out = width * 2**i
            if size >= min_size:
                layers.append(nn.Conv2d(channels, out, kernel_size=4, stride=2, padding=1))
                size //= 2
            else:
                layers.append(nn.Conv2d(channels, out, kernel_size=3, stride=1, padding=1))
            layers.append(nn.LeakyReLU(0.2))
            channels = out
        layers.append(nn.Conv2d(channels, 1, kernel_size=3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, activation: Tensor) -> Tensor:
        return self.net(activation)


def discriminator_for(
    activation_shape: torch.Size | tuple[int, ...], patch_width: int = 64, patch_depth: int = 3
) -> nn.Module:
    """Build the discriminator that fits one tapped layer's activation shape (batch dim included):
    an MLP for vectors (N, C), a patch discriminator of base width ``patch_width`` and
    ``patch_depth`` hidden convolutions for maps (N, C, H, W)."""
    if len(activation_shape) == 2:
        return MLPDiscriminator(activation_shape[1])
    if len(activation_shape) == 4:
        return PatchDiscriminator(
            activation_shape[1], tuple(activation_shape[2:]), width=patch_width, depth=patch_depth
        )
    raise ConfigError(
        f"no discriminator for activations of shape {tuple(activation_shape)}: tap a layer whose "
        "output is (N, C) or (N, C, H, W)"
    )


class GANLoss(nn.Module):
    """The adversarial objective on discriminator logits.

    ``vanilla``: binary cross-entropy on logits (autocast-safe; no sigmoid is applied first).
    ``lsgan``: least squares towards 1 (real) and 0 (fake), Mao et al. 2017.
    The target network's loss uses flipped labels (its activations should look "real"), the
    non-saturating form used by the official code.

    Example:
        >>> gan = GANLoss("vanilla")
        >>> real, fake = torch.full((4, 1), 5.0), torch.full((4, 1), -5.0)
        >>> round(gan.discriminator_loss(real, fake).item(), 3), gan.accuracy(real, fake).item()
        (0.013, 1.0)
    """

    def __init__(self, kind: GANKind = "vanilla"):
        super().__init__()
        if kind not in ("vanilla", "lsgan"):
            raise ConfigError(f"unknown GAN loss {kind!r}: use 'vanilla' or 'lsgan'")
        self.kind = kind

    def _towards(self, logits: Tensor, label: float) -> Tensor:
        if self.kind == "vanilla":
            return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
        return 0.5 * F.mse_loss(logits, torch.full_like(logits, label))

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Loss of a discriminator that sees source activations (real) and target ones (fake)."""
        return self._towards(real_logits, 1.0) + self._towards(fake_logits, 0.0)

    def generator_loss(self, fake_logits: Tensor) -> Tensor:
        """Loss of the target network: its activations should be classified as source."""
        return self._towards(fake_logits, 1.0)

    def accuracy(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Fraction of real and fake outputs the discriminator classifies correctly."""
        threshold = 0.0 if self.kind == "vanilla" else 0.5
        correct = (real_logits > threshold).sum() + (fake_logits <= threshold).sum()
        return correct.float() / (real_logits.numel() + fake_logits.numel())
