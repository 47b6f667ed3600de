"""A 2-process CPU DDP GAM run in which only rank 1 meets a bad batch, launched by
tests/test_ddp_and_resume.py (not collected by pytest).

Usage: python tests/ddp_failure_run.py nan|label. ``nan``: rank 1's target network turns NaN at
the first adaptation batch, so only its losses are NaN; ``label``: rank 1's first source batch
holds a label outside the classes. Both ranks must stop with the same one line naming rank 1.
"""

from __future__ import annotations

import sys

import lightning as L
import torch

from dam_lightning.data import DomainAdaptationDataModule, SynDigits
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule
from tests.conftest import quiet_trainer


class SpoilRankOne(L.Callback):
    """On rank 1 only: NaN weights in F_t when adaptation starts, or a label of 99."""

    def __init__(self, what: str):
        self.what = what

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank != 1:
            return
        if self.what == "label" and not pl_module.adapting:
            batch["source"][1][0] = 99
        if self.what == "nan" and pl_module.adapting:
            with torch.no_grad():
                next(pl_module.target_net.parameters()).fill_(float("nan"))


def main(what: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    data = DomainAdaptationDataModule(SynDigits(256, seed=0), SynDigits(256, seed=1), batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, source_steps=2)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_steps=10,
        callbacks=[SpoilRankOne(what)],
    )
    try:
        trainer.fit(module, data)
    except Exception as err:  # what the CLI shows as "error: ..."
        print(f"[rank {trainer.global_rank}] {type(err).__name__}: {err}", flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1])
