"""RandomAffine (source augmentation) and its use by SourceModule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dam_lightning.data import RandomAffine
from dam_lightning.models import LeNet
from dam_lightning.modules import SourceModule


def test_zoom_shrinks_a_frame_filling_digit_into_the_middle():
    full = torch.ones(1, 1, 28, 28)  # a "digit" that fills its frame, as resized USPS does
    half = RandomAffine(zoom=(0.5, 0.5), degrees=0, shift=0)(full)
    assert half.sum().item() == pytest.approx(28 * 28 / 4, rel=0.1)  # a quarter of the area
    assert half[..., :6, :].abs().max() == 0 and half[..., -6:, :].abs().max() == 0  # borders
    assert half[..., 10:18, 10:18].min() > 0.99  # the middle keeps the ink


def test_every_image_gets_its_own_warp_and_a_seed_repeats_them():
    images = torch.rand(1, 1, 28, 28).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    first = RandomAffine()(images)
    assert len({round(img.sum().item(), 3) for img in first}) == 8
    torch.manual_seed(0)
    assert torch.equal(RandomAffine()(images), first)


def test_eval_mode_leaves_images_alone():
    images = torch.rand(3, 1, 28, 28)
    assert RandomAffine().eval()(images) is images


@pytest.mark.parametrize(
    "kwargs", [dict(zoom=(0, 1)), dict(zoom=(1.0, 0.5)), dict(degrees=-1), dict(shift=-0.1)]
)
def test_bad_ranges_are_clear_errors(kwargs):
    with pytest.raises(ValueError, match="zoom|degrees"):
        RandomAffine(**kwargs)


class Spy(nn.Module):
    """Records the batches it sees and returns them unchanged."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x)
        return x


@pytest.mark.filterwarnings("ignore:You are trying to .self.log")
def test_source_module_augments_training_batches_only():
    spy = Spy()
    module = SourceModule(LeNet, num_classes=10, augment=spy)
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    module.training_step({"source": (x, y)}, 0)
    assert len(spy.seen) == 1 and spy.seen[0] is x
    module.eval()
    module(x)  # evaluation goes straight to the network
    assert len(spy.seen) == 1
    assert SourceModule(LeNet, num_classes=10).augment is None  # the paper's default: none
