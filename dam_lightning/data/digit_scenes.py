"""DigitScenes: small segmentation scenes composed from digit images, built in memory.

A synthetic -> real segmentation domain gap that needs no download: rendered digits on flat
canvases (the source) against handwritten digits photographed on textured, coloured, blurred,
noisy canvases (the target). It only composes and labels scenes; it never reads target labels
for training (the data module drops them) and never downloads.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from dam_lightning.data.attributes import InfoAttributes
from dam_lightning.data.digits import DigitDataset
from dam_lightning.data.labels import DIGIT_CLASSES, DIGIT_SCENES_INFO, IGNORE_INDEX
from dam_lightning.errors import DataError

__all__ = ["DigitScenes"]

BACKGROUND = len(DIGIT_CLASSES)

STROKE_ALPHA = 0.5
"""A pixel whose glyph coverage is at least this is labelled with the digit."""
RIM_ALPHA = 0.1
"""Coverage in [RIM_ALPHA, STROKE_ALPHA) is the anti-aliased rim: labelled 255 (ignored)."""

Split = Literal["all", "adapt", "val", "test"]
Appearance = Literal["render", "camera"]
SPLIT_FRACTIONS = {"adapt": 0.6, "val": 0.2, "test": 0.2}
"""How the digit images of the pool are shared out; the three parts are disjoint."""


class DigitScenes(InfoAttributes, Dataset):
    """Segmentation scenes of 2-4 digits at random positions and sizes, with per-pixel labels.

    Each scene pastes digit images of ``digits`` (any ``DigitDataset``: ``SynDigits``,
    ``UCIDigits``, ``MNIST``, ``USPS``) onto a ``size`` x ``size`` RGB canvas without their ink
    boxes overlapping. The label is the digit's class where its coverage is >= 0.5, 255 on the
    anti-aliased rim (coverage 0.1-0.5) and ``background`` (10) elsewhere; it is computed from
    the pasted coverage, before any appearance change. ``appearance`` decides how the scene looks:

    - ``"render"`` (the synthetic source): a flat dark grey background, flat light grey ink, as a
      renderer draws it;
    - ``"camera"`` (the real target): a smoothly varying coloured background with a fine
      texture, coloured ink, a Gaussian blur, sensor noise and a random contrast, gamma and
      brightness per image.

    ``split`` takes a fixed, disjoint part of ``digits`` (``split_seed`` chooses it, the scene
    ``seed`` does not): ``"adapt"`` 60% of the images (the unlabelled target), ``"val"`` 20%
    (choosing a recipe), ``"test"`` 20% (the reported numbers); ``"all"`` uses every image (the
    source). So the digit images scored never appear in an adaptation scene. The same
    arguments give bitwise-identical tensors.

    Example:
        >>> from dam_lightning.data import UCIDigits
        >>> scenes = DigitScenes(UCIDigits(), num_scenes=4, split="test", appearance="camera")
        >>> image, label = scenes[0]
        >>> image.shape, label.shape, scenes.num_classes, scenes.task
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), 11, 'segmentation')
    """

    info = DIGIT_SCENES_INFO

    def __init__(
        self,
        digits: DigitDataset,
        num_scenes: int = 1000,
        split: Split = "all",
        appearance: Appearance = "render",
        size: int = 64,
        digits_per_scene: tuple[int, int] = (2, 4),
        digit_size: tuple[int, int] = (22, 34),
        seed: int = 0,
        split_seed: int = 0,
    ):
        _check_arguments(num_scenes, split, appearance, size, digits_per_scene, digit_size)
        self.digits, self.split, self.appearance, self.size = digits, split, appearance, size
        self.pool = split_indices(len(digits), split, split_seed)
        if len(self.pool) == 0:
            raise DataError(f"DigitScenes: {digits!r} has no images for split {split!r}")
        # The scenes of the splits differ even with one seed; the images of a split do not
        # depend on the appearance, so "render" and "camera" scenes share their layouts.
        rng = np.random.default_rng([seed, list(SPLIT_CODES).index(split)])
        glyphs = digits.images[:, 0]  # (N, 28, 28) coverage in [0, 1]
        coverage = torch.zeros(num_scenes, size, size)
        labels = torch.full((num_scenes, size, size), BACKGROUND, dtype=torch.uint8)
        self.layouts: list[list[tuple[int, int, int, int, int]]] = []
        for scene in range(num_scenes):
            layout = _layout(rng, self.pool, size, digits_per_scene, digit_size)
            for index, top, left, side in layout:
                alpha = _resized(glyphs[index], side)
                _paste(coverage[scene], labels[scene], alpha, int(digits.labels[index]), top, left)
            self.layouts.append(
                [
                    (index, int(digits.labels[index]), top, left, side)
                    for index, top, left, side in layout
                ]
            )
        self.labels = labels
        self.images = _paint(coverage, appearance, rng)

    @property
    def name(self) -> str:
        return f"DigitScenes({_digits_name(self.digits)}, {self.split}, {self.appearance})"

    @property
    def digit_indices(self) -> set[int]:
        """Indices into ``digits`` of every image pasted into some scene."""
        return {item[0] for layout in self.layouts for item in layout}

    def __len__(self) -> int:
        return len(self.labels)

    def item_name(self, index: int) -> str:
        """The name ``predict`` writes scene ``index`` under: split, appearance and index, so
        the files of two demo sets never collide (a scene has no file of its own to be named
        after).

        Example:
            >>> from dam_lightning.data import UCIDigits
            >>> DigitScenes(UCIDigits(), num_scenes=2, split="test").item_name(1)
            'test_render_00001'
        """
        return f"{self.split}_{self.appearance}_{index:05d}"

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index].long()

    def __repr__(self) -> str:
        return (
            f"DigitScenes(digits={_digits_name(self.digits)}, split={self.split!r}, "
            f"appearance={self.appearance!r}, size={len(self)})"
        )


SPLIT_CODES = ("all", "adapt", "val", "test")


def split_indices(n: int, split: Split, split_seed: int = 0) -> np.ndarray:
    """The indices of ``split`` among ``n`` digit images: a fixed permutation of ``0..n-1``
    (by ``split_seed``) cut into adapt / val / test parts of 60 / 20 / 20%.

    Example:
        >>> parts = [set(split_indices(10, s).tolist()) for s in ("adapt", "val", "test")]
        >>> [len(p) for p in parts], set.union(*parts) == set(range(10))
        ([6, 2, 2], True)
    """
    if split == "all":
        return np.arange(n)
    order = np.random.default_rng(split_seed).permutation(n)
    ends = np.cumsum([round(SPLIT_FRACTIONS[s] * n) for s in ("adapt", "val")])
    start, end = {"adapt": (0, ends[0]), "val": (ends[0], ends[1]), "test": (ends[1], n)}[split]
    return np.sort(order[start:end])


def _check_arguments(num_scenes, split, appearance, size, digits_per_scene, digit_size) -> None:
    if num_scenes < 1:
        raise DataError(f"DigitScenes: num_scenes must be at least 1, got {num_scenes}")
    if split not in SPLIT_CODES:
        raise DataError(f"DigitScenes: split must be one of {SPLIT_CODES}, got {split!r}")
    if appearance not in ("render", "camera"):
        raise DataError(
            f"DigitScenes: appearance must be 'render' or 'camera', got {appearance!r}"
        )
    low, high = digit_size
    if not 8 <= low <= high <= size:
        raise DataError(
            f"DigitScenes: digit_size {tuple(digit_size)} must satisfy 8 <= low <= high <= "
            f"size ({size})"
        )
    if not 1 <= digits_per_scene[0] <= digits_per_scene[1]:
        raise DataError(
            f"DigitScenes: digits_per_scene {tuple(digits_per_scene)} must be (low, high) with "
            "1 <= low <= high"
        )


def _digits_name(digits) -> str:
    return getattr(digits, "name", type(digits).__name__)


def _layout(rng, pool, size, digits_per_scene, digit_size) -> list[tuple[int, int, int, int]]:
    """(image index, top, left, side) of each digit of one scene. A digit whose ink box (the
    middle 20/28 of its square) would overlap an earlier one's is tried elsewhere, up to 30
    times, then left out; so a crowded scene may hold fewer digits than drawn."""
    count = int(rng.integers(digits_per_scene[0], digits_per_scene[1] + 1))
    placed, boxes = [], []
    for _ in range(count):
        index = int(pool[rng.integers(len(pool))])
        side = int(rng.integers(digit_size[0], digit_size[1] + 1))
        margin = round(side * 4 / 28)
        for _attempt in range(30):
            top, left = (int(v) for v in rng.integers(-margin, size - side + margin + 1, size=2))
            box = (top + margin, left + margin, top + side - margin, left + side - margin)
            if all(_disjoint(box, other) for other in boxes):
                placed.append((index, top, left, side))
                boxes.append(box)
                break
    return placed


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _resized(glyph: Tensor, side: int) -> Tensor:
    """A 28x28 coverage image scaled to side x side (antialiased bilinear), in [0, 1]."""
    out = F.interpolate(glyph[None, None], size=(side, side), mode="bilinear", antialias=True)
    return out[0, 0].clamp(0.0, 1.0)


def _paste(coverage: Tensor, labels: Tensor, alpha: Tensor, digit: int, top: int, left: int):
    """Composite one digit over the scene (alpha over), clipped at the canvas edges; its
    strokes take its class and its rim 255, over whatever was there."""
    size = coverage.shape[-1]
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + alpha.shape[0], size), min(left + alpha.shape[1], size)
    a = alpha[t0 - top : t1 - top, l0 - left : l1 - left]
    region = coverage[t0:t1, l0:l1]
    region.mul_(1 - a).add_(a)
    label = labels[t0:t1, l0:l1]
    label[(a >= RIM_ALPHA) & (a < STROKE_ALPHA)] = IGNORE_INDEX
    label[a >= STROKE_ALPHA] = digit


def _paint(coverage: Tensor, appearance: str, rng: np.random.Generator) -> Tensor:
    """RGB images (N, 3, H, W) in [0, 1] from the scenes' ink coverage."""
    n, size = coverage.shape[0], coverage.shape[-1]
    ink = coverage[:, None]
    if appearance == "render":
        background = torch.from_numpy(rng.uniform(0.0, 0.15, (n, 1, 1, 1))).float()
        colour = torch.from_numpy(rng.uniform(0.85, 1.0, (n, 1, 1, 1))).float()
        return (background + (colour - background) * ink).expand(n, 3, size, size).contiguous()
    draw = _camera_draws(rng, n, size)
    # Background: a smooth colour field (a 4x4 grid of colours, upsampled) plus a fine texture.
    field = F.interpolate(draw["field"], size=(size, size), mode="bicubic", align_corners=False)
    texture = F.interpolate(draw["texture"], size=(size, size), mode="bilinear")
    background = draw["base"] + field + texture
    colour = background.mean(dim=(2, 3), keepdim=True) + draw["ink"]
    image = background * (1 - ink) + colour * ink
    image = _gaussian_blur(image, draw["blur"])
    image = image + draw["noise"]
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    image = (image - mean) * draw["contrast"] + mean + draw["brightness"]
    return image.clamp(0.0, 1.0) ** draw["gamma"]


def _camera_draws(rng: np.random.Generator, n: int, size: int) -> dict[str, Tensor]:
    """Every random number of the camera look, drawn in one fixed order."""

    def uniform(low, high, shape):
        return torch.from_numpy(rng.uniform(low, high, shape)).float()

    return {
        "base": uniform(0.05, 0.45, (n, 3, 1, 1)),
        "field": uniform(-0.15, 0.15, (n, 3, 4, 4)),
        "texture": torch.from_numpy(rng.normal(0.0, 0.05, (n, 1, size // 2, size // 2))).float(),
        "ink": uniform(0.25, 0.55, (n, 3, 1, 1)),
        "blur": uniform(0.4, 1.3, (n,)),
        "noise": torch.from_numpy(rng.normal(0.0, 0.04, (n, 3, size, size))).float(),
        "contrast": uniform(0.5, 1.0, (n, 1, 1, 1)),
        "brightness": uniform(-0.05, 0.2, (n, 1, 1, 1)),
        "gamma": uniform(0.7, 1.4, (n, 1, 1, 1)),
    }


def _gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Blur each image with its own Gaussian (one grouped convolution for the whole batch)."""
    n, c, h, w = images.shape
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigmas[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    flat = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)
