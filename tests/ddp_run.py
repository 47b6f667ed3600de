"""A 2-process CPU DDP GAM run, launched by tests/test_ddp_and_resume.py (not collected by pytest).

Usage: python tests/ddp_run.py OUTDIR [default]. Lightning re-launches this script for rank 1.
Each rank saves its target network, discriminators and last Gaussian-matching statistics to
OUTDIR, with the gradient bytes it all-reduced per GAM batch. ``default``: DDP's own all-reduce of
every bucket (registered first, so the module keeps it) instead of the module's reduction of the
stepped network's gradients alone.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import Subset

from dam_lightning.callbacks import GaussianMatching
from dam_lightning.data import DomainAdaptationDataModule, SynDigits, UCIDigits
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule
from tests.conftest import quiet_trainer


class ByteCount:
    bytes_reduced = 0


def counting_all_reduce(state: ByteCount, bucket):
    """DDP's default hook (average every bucket), counting the bytes it all-reduces."""
    buffer = bucket.buffer()
    state.bytes_reduced += buffer.numel() * buffer.element_size()
    future = dist.all_reduce(buffer.div_(dist.get_world_size()), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


class SaveRankState(L.Callback):
    def __init__(self, outdir: str, default: bool):
        self.outdir = outdir
        self.default = ByteCount() if default else None
        self.bytes_before_adapting = self.gam_batches = 0

    def on_fit_start(self, trainer, pl_module):
        if self.default is not None:
            trainer.strategy.model.register_comm_hook(self.default, counting_all_reduce)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.adapting and not self.gam_batches:
            self.bytes_before_adapting = self._bytes(pl_module)
        self.gam_batches += pl_module.adapting

    def _bytes(self, pl_module) -> int:
        return (self.default or pl_module.gradient_reduction).bytes_reduced

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        state["val/target/acc"] = trainer.callback_metrics["val/target/acc"].cpu()
        gam_bytes = self._bytes(pl_module) - self.bytes_before_adapting
        state["gradient_bytes_per_gam_batch"] = torch.tensor(gam_bytes / self.gam_batches)
        torch.save(state, os.path.join(self.outdir, f"rank{trainer.global_rank}.pt"))


def main(outdir: str, default: bool = False) -> None:
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
        callbacks=[GaussianMatching(calibration_batches=2), SaveRankState(outdir, default)],
    )
    trainer.fit(module, dm)


if __name__ == "__main__":
    main(sys.argv[1], default=sys.argv[2:] == ["default"])
