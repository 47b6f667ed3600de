"""Joint image/mask transforms for segmentation: resize, random scale + crop + flip, normalise.

Built on ``torchvision.transforms.v2`` with ``tv_tensors.Image``/``tv_tensors.Mask``, so every
geometric step is applied to image and mask together. Masks are only ever resized with nearest
neighbour and padded with 255 (ignored): a mask value is never interpolated. No id mapping here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dam_lightning.data.labels import IGNORE_INDEX
from dam_lightning.errors import DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegmentationTransform", "resize_mask"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class SegmentationTransform:
    """Turn a uint8 image (3, H, W) and an optional uint8 mask (H, W) into network inputs.

    Evaluation (``train_augment=False``): the image is resized to ``size`` (bilinear,
    antialiased); the mask is resized to ``size`` with nearest neighbour (``resize_mask``), or
    left at its own resolution when ``resize_mask=False`` (scoring at label resolution).

    Training (``train_augment=True``): one random factor ``s`` drawn uniformly from
    ``scale_range`` resizes image and mask to ``s * size``; then a random ``crop_size`` crop
    (padding the image with 0 and the mask with 255 where the scaled image is smaller) and a
    random horizontal flip, all applied to both alike. Randomness comes from torch's global RNG,
    which DataLoader workers seed per worker.

    Finally the image becomes float32 in [0, 1], normalised by ``mean``/``std``. The mask keeps
    its dtype and values (map ids afterwards). ``size=None`` keeps the file resolution.

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
    """

    def __init__(
        self,
        size: Sequence[int] | None = (512, 1024),
        train_augment: bool = False,
        scale_range: Sequence[float] = (0.5, 1.5),
        crop_size: Sequence[int] | None = None,
        resize_mask: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.size = _pair("size", size)
        self.crop_size = _pair("crop_size", crop_size) or self.size
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise DataError(
                f"scale_range {tuple(scale_range)} must be (low, high) with 0 < low <= high, "
                "e.g. (0.5, 1.5)"
            )
        if train_augment and not resize_mask:
            raise DataError(
                "train_augment=True crops image and mask together, so the mask cannot stay at "
                "its native size: use label_size='input' for training sets"
            )
        if train_augment and self.crop_size is None:
            raise DataError("train_augment=True with size=None needs a crop_size=(H, W)")
        self.train_augment, self.resize_mask = train_augment, resize_mask
        self.scale_range = (low, high)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self._crop_and_flip = None
        if train_augment:
            fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            self._crop_and_flip = v2.Compose(
                [
                    v2.RandomCrop(self.crop_size, pad_if_needed=True, fill=fill),
                    v2.RandomHorizontalFlip(),
                ]
            )

    def eval_view(self) -> SegmentationTransform:
        """The same resize and normalisation without the random steps."""
        return SegmentationTransform(
            self.size,
            train_augment=False,
            crop_size=self.crop_size,
            resize_mask=self.resize_mask,
            mean=self.mean,
            std=self.std,
        )

    def __call__(self, image: Tensor, mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        image = tv_tensors.Image(image)
        if mask is not None:
            mask = tv_tensors.Mask(mask)
        if self.train_augment:
            image, mask = self._augment(image, mask)
        elif self.size is not None:
            image = F.resize(image, list(self.size), InterpolationMode.BILINEAR, antialias=True)
            if mask is not None and self.resize_mask:
                mask = resize_mask(mask, self.size)
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        image = image.as_subclass(Tensor)
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
            parts += [f"scale_range={self.scale_range}", f"crop_size={self.crop_size}", "flip"]
        if not self.resize_mask:
            parts.append("resize_mask=False")
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
