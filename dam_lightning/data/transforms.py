"""Joint image/mask transforms for segmentation: resize, random scale + crop + flip, normalise.

Built on ``torchvision.transforms.v2`` with ``tv_tensors.Image``/``tv_tensors.Mask``, so every
geometric step is applied to image and mask together. Masks are only ever resized with nearest
neighbour and padded with 255 (ignored): a mask value is never interpolated. No id mapping here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dam_lightning.data.labels import IGNORE_INDEX
from dam_lightning.errors import DataError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LabelSize", "SegmentationTransform", "resize_mask",
]  # fmt: skip

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

LabelSize = Literal["input", "native"]


@dataclass(frozen=True)
class SegmentationTransform:
    """How a segmentation dataset turns a uint8 image (3, H, W) and an optional uint8 mask
    (H, W) into network inputs: the settings (one config mapping, ``transform:``) and the
    callable that applies them.

    Evaluation (``train_augment=False``): the image is resized to ``size`` (bilinear,
    antialiased); the mask is resized to ``size`` with nearest neighbour (``resize_mask``), or
    left at its own resolution when ``label_size="native"`` (scoring at label resolution).

    Training (``train_augment=True``): one random factor ``s`` drawn uniformly from
    ``scale_range`` resizes image and mask to ``s * size``; then a random ``crop_size`` crop
    (padding the image with 0 and the mask with 255 where the scaled image is smaller) and a
    random horizontal flip, all applied to both alike. Randomness comes from torch's global RNG,
    which DataLoader workers seed per worker.

    Finally the image becomes float32 in [0, 1], normalised by ``mean``/``std``. The mask keeps
    its dtype and values (map ids afterwards). Frozen: ``dataclasses.replace`` makes a variant
    (``eval_view``). In a config it is a nested mapping of the dataset's init args::

        transform: {size: [512, 1024], train_augment: true}

    Example:
        >>> t = SegmentationTransform(size=(4, 8))
        >>> image = torch.zeros(3, 8, 16, dtype=torch.uint8)
        >>> mask = torch.tensor([[7] * 8 + [26] * 8] * 8, dtype=torch.uint8)
        >>> x, y = t(image, mask)
        >>> x.shape, x.dtype, y.shape, y.unique().tolist()
        (torch.Size([3, 4, 8]), torch.float32, torch.Size([4, 8]), [7, 26])
        >>> aug = SegmentationTransform(size=(4, 8), train_augment=True, crop_size=(4, 4))
        >>> [tuple(v.shape) for v in aug(image, mask)]
        [(3, 4, 4), (4, 4)]
        >>> tuple(t(image).shape)  # no mask: the image alone
        (3, 4, 8)
        >>> aug.eval_view()
        SegmentationTransform(size=(4, 8))
    """

    size: tuple[int, int] | None = (512, 1024)
    """The network input (H, W) every image is resized to; None keeps the file resolution."""
    label_size: LabelSize | None = None
    """``"input"``: the label is resized (nearest) to ``size``; ``"native"``: it keeps its file
    resolution (scoring at label resolution). None: the dataset's default, ``"input"`` except
    for Cityscapes' val and test splits (``"native"``)."""
    train_augment: bool = False
    """Random joint scale, crop and horizontal flip (training sets)."""
    scale_range: tuple[float, float] = (0.5, 1.5)
    """(low, high) of the random scale factor of ``size``, with ``train_augment``."""
    crop_size: tuple[int, int] | None = None
    """(H, W) of the random crop, with ``train_augment``; None: ``size``."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted from the image in [0, 1] (ImageNet's)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation the image is divided by (ImageNet's)."""

    def __post_init__(self):
        if self.label_size not in ("input", "native", None):
            raise DataError(f"label_size must be 'input' or 'native', got {self.label_size!r}")
        low, high = (float(v) for v in self.scale_range)
        if not 0 < low <= high:
            raise DataError(
                f"scale_range {tuple(self.scale_range)} must be (low, high) with 0 < low <= high, "
                "e.g. (0.5, 1.5)"
            )
        normalised = {  # YAML and jsonargparse give lists: store hashable tuples
            "size": _pair("size", self.size),
            "crop_size": _pair("crop_size", self.crop_size),
            "scale_range": (low, high),
            "mean": tuple(float(m) for m in self.mean),
            "std": tuple(float(s) for s in self.std),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        if self.train_augment and self.label_size == "native":
            raise DataError(
                "train_augment=True crops image and mask together, so the mask cannot stay at "
                "its native size: use label_size='input' for training sets"
            )
        if self.train_augment and self.crop_size is None and self.size is None:
            raise DataError("train_augment=True with size=None needs a crop_size=(H, W)")

    @property
    def resize_mask(self) -> bool:
        """Whether the mask is resized to ``size`` (``label_size`` is not ``"native"``)."""
        return self.label_size != "native"

    def eval_view(self) -> SegmentationTransform:
        """The same resize and normalisation without the random steps."""
        return replace(self, train_augment=False)

    @cached_property
    def _crop_and_flip(self) -> v2.Compose:
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        return v2.Compose(
            [
                v2.RandomCrop(self.crop_size or self.size, pad_if_needed=True, fill=fill),
                v2.RandomHorizontalFlip(),
            ]
        )

    @cached_property
    def _scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """``(x / 255 - mean) / std`` as ``x * scale + shift``, per channel (3, 1, 1)."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return 1.0 / (255.0 * std), -mean / std

    def normalise(self, image: Tensor) -> Tensor:
        """uint8 (3, H, W) -> contiguous float32 in [0, 1], less ``mean``, over ``std``, equal to
        torchvision's ``to_dtype`` + ``normalize`` within 1e-6. The cast is a copy into a
        contiguous buffer (the resize leaves the channels-last layout of the decoded image),
        then two in-place passes: 1.1 ms at 512x1024 on one thread, against 1.5 ms for one
        ``addcmul`` on the strided cast."""
        scale, shift = self._scale_and_shift
        out = torch.empty(image.shape, dtype=torch.float32, device=image.device)
        return out.copy_(image.as_subclass(Tensor)).mul_(scale).add_(shift)

    def __call__(self, image: Tensor, mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if self.train_augment:
            image, mask = self._augment(
                tv_tensors.Image(image), None if mask is None else tv_tensors.Mask(mask)
            )
        elif self.size is not None:  # plain tensors: no tv_tensors wrapping to pay for
            size = list(self.size)
            image = F.resize_image(image, size, InterpolationMode.BILINEAR, antialias=True)
            if mask is not None and self.resize_mask:
                mask = resize_mask(mask, self.size)
        image = self.normalise(image)
        return image if mask is None else (image, mask.as_subclass(Tensor))

    def _augment(self, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        height, width = self.size or image.shape[-2:]
        scaled = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = F.resize(image, scaled, InterpolationMode.BILINEAR, antialias=True)
        if mask is None:
            return self._crop_and_flip(image), None
        return self._crop_and_flip(image, resize_mask(mask, scaled))

    def __repr__(self) -> str:
        parts = [f"size={self.size}"]
        if self.train_augment:
            crop = self.crop_size or self.size
            parts += [f"scale_range={self.scale_range}", f"crop_size={crop}", "flip"]
        if not self.resize_mask:
            parts.append("label_size='native'")
        return f"{type(self).__name__}({', '.join(parts)})"


def resize_mask(mask: Tensor, size: Sequence[int]) -> tv_tensors.Mask:
    """``mask`` (H, W) resized to ``size`` by nearest neighbour sampled at pixel centres.

    ``NEAREST_EXACT`` (as PIL's nearest), not torch's ``NEAREST``, which samples the top-left of
    each cell and so shifts masks by up to half an input pixel against the bilinear image.
    ``resize_image`` is called directly: older ``resize_mask`` versions ignore the mode.

    Example:
        >>> resize_mask(torch.arange(16, dtype=torch.uint8).reshape(4, 4), (2, 2)).tolist()
        [[5, 7], [13, 15]]
    """
    plain = mask.as_subclass(Tensor)[None]
    resized = F.resize_image(plain, list(size), InterpolationMode.NEAREST_EXACT)[0]
    return tv_tensors.Mask(resized)


def _pair(name: str, value: Sequence[int] | None) -> tuple[int, int] | None:
    """``value`` as an (H, W) tuple of positive ints (YAML gives lists), or None."""
    if value is None:
        return None
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise DataError(f"{name} must be (height, width) with positive ints, got {value!r}")
    return pair
