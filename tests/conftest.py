"""Shared test setup: no W&B account or network, quiet Lightning, small CPU thread count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent
SHARED_DIGITS = REPO.parent / "shared" / "data" / "digits"


@pytest.fixture
def tiny_digits():
    """A small SynDigits -> UCIDigits pair of datasets (source, target)."""
    from dam_lightning.data.digits import SynDigits, UCIDigits

    target = UCIDigits()
    target_small = torch.utils.data.Subset(target, range(200))
    target_small.num_classes = target.num_classes
    return SynDigits(num_samples=300, seed=0), target_small
