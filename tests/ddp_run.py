"""A 2-process CPU DDP GAM run, launched by tests/test_ddp_and_resume.py (not collected by pytest).

Usage: python tests/ddp_run.py OUTDIR. Lightning re-launches this script for rank 1. Each rank
saves its target network, discriminators and last Gaussian-matching statistics to OUTDIR.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from torch.utils.data import Subset

from dam_lightning.callbacks import GaussianMatching
from dam_lightning.data import DomainAdaptationDataModule, SynDigits, UCIDigits
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule
from tests.conftest import quiet_trainer


class SaveRankState(L.Callback):
    def __init__(self, outdir: str):
        self.outdir = outdir

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        state["val/target/acc"] = trainer.callback_metrics["val/target/acc"].cpu()
        torch.save(state, os.path.join(self.outdir, f"rank{trainer.global_rank}.pt"))


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    target = UCIDigits()
    target_small = Subset(target, range(255))  # odd: a padding sampler would repeat an image
    target_small.num_classes = target.num_classes
    dm = DomainAdaptationDataModule(SynDigits(400, seed=0), target_small, batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, source_steps=5)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_epochs=3,  # 5 source batches (stage 1), then 4 adaptation batches
        limit_train_batches=3,
        limit_val_batches=None,
        callbacks=[GaussianMatching(calibration_batches=2), SaveRankState(outdir)],
    )
    trainer.fit(module, dm)


if __name__ == "__main__":
    main(sys.argv[1])
