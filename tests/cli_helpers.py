"""Classes that CLI tests name by class_path to provoke a bad input (not collected by pytest)."""

from __future__ import annotations

import lightning as L
import torch

from dam_lightning.data import SynDigits


class OneBasedDigits(SynDigits):
    """SynDigits whose labels are 1..10 instead of 0..9 (a common off-by-one in a dataset)."""

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        return x, y + 1


class PoisonTargetNetwork(L.Callback):
    """Fill F_t's first weight with NaN at the start of epoch ``at_epoch``, as a diverged
    adaptation would (the discriminator loss of every matched layer becomes NaN)."""

    def __init__(self, at_epoch: int = 1):
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.at_epoch:
            with torch.no_grad():
                next(pl_module.target_net.parameters()).fill_(float("nan"))


class PoisonBeforeCheckpoint(L.Callback):
    """Fill F_t's first weight with NaN at the end of the last batch of epoch 0, just before
    ModelCheckpoint writes its epoch-end checkpoint."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            next(pl_module.target_net.parameters()).fill_(float("nan"))


class DictItems(SynDigits):
    """SynDigits whose items are dicts, which a domain-adaptation dataset may not return."""

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        return {"image": x, "label": y}
