"""In-memory toy segmentation data and a tiny network, for tests that need no files."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from dam_lightning.data.labels import DatasetInfo

CLASSES = ["road", "car", "sky"]


class TinySegNet(nn.Module):
    """1x1 conv then 2x downsampling: logits at half the input's size, like ERFNet's encoder."""

    example_input_shape = (3, 8, 8)

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x))


class Scenes(Dataset):
    """Images whose colour channel c is bright where the label is class c; some pixels 255."""

    info = DatasetInfo("segmentation", 3, tuple(CLASSES))

    def __init__(self, n: int = 8, size: int | tuple[int, int] = 8, seed: int = 0, shift=0.0):
        height, width = (size, size) if isinstance(size, int) else size
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n, height, width), generator=g)
        self.labels[:, 0, :] = 255
        self.images = nn.functional.one_hot(self.labels.clamp_max(2), 3).permute(0, 3, 1, 2)
        noise = 0.1 * torch.randn(n, 3, height, width, generator=g)
        self.images = self.images.float() + noise + shift

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]
