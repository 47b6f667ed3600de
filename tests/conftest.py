"""Shared test setup: no W&B account or network, quiet Lightning, small CPU thread count."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# A fixed thread count: the CLI would otherwise choose one from the machine's load at each run
# (dam_lightning.cpu_threads), and runs compared to the last bit must use the same one.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent
SHARED_DIGITS = REPO.parent / "shared" / "data" / "digits"


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer that logs, checkpoints and prints nothing unless asked to."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def tiny_digits():
    """A small SynDigits -> UCIDigits pair of datasets (source, target)."""
    from dam_lightning.data.digits import SynDigits, UCIDigits

    target = UCIDigits()
    target_small = torch.utils.data.Subset(target, range(200))
    target_small.num_classes = target.num_classes
    return SynDigits(num_samples=300, seed=0), target_small


@pytest.fixture
def one_thread():
    """Toy tensors gain nothing from threads, and on a busy machine OpenMP's spin-waiting
    between two threads makes each tiny op ~100x slower: one torch thread for the test.
    Modules of small-tensor tests use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
