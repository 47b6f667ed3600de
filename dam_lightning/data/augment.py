"""Batch augmentation for source training: a random affine warp per image, in plain torch.

Not part of the paper. It exists because the digits domains differ in *geometry* as well as in
style: USPS digits fill their 16x16 frame (so, resized, the whole 28x28 image), MNIST digits sit
in the middle 20x20 of a 28x28 image. A LeNet trained on USPS alone then calls most MNIST 9s
"4", and adversarial matching of the output distribution can move whole classes onto others
(docs/results/confusion.md). Shrinking, shifting and rotating the source images at random
during source training teaches the network digits of every size and place; it looks at no
target label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dam_lightning.errors import DataError


class RandomAffine(nn.Module):
    """Warp every image of a batch by its own random zoom, rotation and shift.

    Args:
        zoom: range of the content's scale; (0.7, 1.0) shrinks a digit that fills the frame to
            as little as 70% of it, about the size of an MNIST digit.
        degrees: rotations are drawn from [-degrees, degrees].
        shift: translations are drawn from [-shift, shift] as a fraction of half the image side
            (0.1 on 28x28: up to 1.4 pixels).

    The draws come from torch's global generator, so ``seed_everything`` makes a run
    repeatable. Pixels that come from outside the image are 0 (the digits' background). Active
    in training mode only; in eval mode it returns its input.

    Example:
        >>> x = torch.rand(4, 1, 28, 28)
        >>> RandomAffine()(x).shape
        torch.Size([4, 1, 28, 28])
        >>> torch.allclose(RandomAffine(zoom=(1, 1), degrees=0, shift=0)(x), x, atol=1e-5)
        True
    """

    def __init__(
        self,
        zoom: tuple[float, float] = (0.7, 1.0),
        degrees: float = 10.0,
        shift: float = 0.1,
    ):
        super().__init__()
        low, high = zoom
        if not 0 < low <= high:
            raise DataError(f"zoom must be a range (low, high) with 0 < low <= high, got {zoom}")
        if degrees < 0 or shift < 0:
            raise DataError(f"degrees and shift must be >= 0, got {degrees} and {shift}")
        self.zoom = (float(low), float(high))
        self.degrees = float(degrees)
        self.shift = float(shift)

    def forward(self, images: Tensor) -> Tensor:
        if not self.training:
            return images
        n = images.shape[0]
        options = dict(device=images.device, dtype=images.dtype)
        zoom = torch.empty(n, **options).uniform_(*self.zoom)
        angle = torch.empty(n, **options).uniform_(-self.degrees, self.degrees) * math.pi / 180
        shift = torch.empty(n, 2, **options).uniform_(-self.shift, self.shift)
        # affine_grid maps output to input coordinates: dividing by the zoom shrinks the content.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")

    def extra_repr(self) -> str:
        return f"zoom={self.zoom}, degrees={self.degrees}, shift={self.shift}"
