"""A 2-process CPU DDP GAM run on a tiny ERFNet, launched by tests/test_gam_segmentation.py (not
collected by pytest).

Usage: python tests/ddp_segmentation_run.py OUTDIR MODE [CHECKPOINT]. Lightning re-launches this
script for rank 1. Each rank saves its module state and validation mIoU to OUTDIR; a checkpoint is
written to OUTDIR/checkpoints/step=9.ckpt, in the middle of epoch 1; with CHECKPOINT the run
resumes from it.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dam_lightning.callbacks import GaussianMatching
from dam_lightning.data import DomainAdaptationDataModule
from dam_lightning.models import ERFNet
from dam_lightning.modules import GAMAdaptModule
from tests.conftest import quiet_trainer
from tests.toy_segmentation import CLASSES, Scenes


class SaveRankState(L.Callback):
    def __init__(self, outdir: str):
        self.outdir = outdir

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        state["val/target/miou"] = trainer.callback_metrics["val/target/miou"].cpu()
        torch.save(state, os.path.join(self.outdir, f"rank{trainer.global_rank}.pt"))


def small_erfnet(num_classes: int) -> ERFNet:
    return ERFNet(num_classes, width=0.25, dropout=0, example_input_shape=(3, 32, 64))


def main(outdir: str, mode: str, resume: str | None = None) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    # 7 validation images: an odd count that a padding sampler would have to repeat
    dm = DomainAdaptationDataModule(
        Scenes(16, (32, 64)), Scenes(16, (32, 64), seed=1, shift=0.5),
        target_val=Scenes(7, (32, 64), seed=2, shift=0.5), batch_size=2,
    )  # fmt: skip
    module = GAMAdaptModule(
        small_erfnet,
        num_classes=3,
        task="segmentation",
        class_names=CLASSES,
        layers={"encoder.layers.6": 1.0, "output": 1.0},
        gan_loss="lsgan",
        adversarial_weight=0.1,
        drift_reduction="sum",
        discriminator_width=8,
        source_steps=3,
    )
    # 4 batches per epoch and rank: epoch 0 is 3 source steps and 1 GAM batch (2 steps); the
    # checkpoint at step 9 is after the second batch of epoch 1 (GaussianMatching at its start)
    checkpoint = ModelCheckpoint(
        dirpath=os.path.join(outdir, "checkpoints"), every_n_train_steps=9, save_top_k=-1,
        filename="{step}",
    )  # fmt: skip
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_epochs=3,
        limit_val_batches=None,
        enable_checkpointing=True,
        callbacks=[GaussianMatching(calibration_batches=1, mode=mode), SaveRankState(outdir),
                   checkpoint],  # fmt: skip
    )
    trainer.fit(module, dm, ckpt_path=resume)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
