"""What CLI tests share (not collected by pytest): ``print_config``, and classes they name by
class_path to provoke a bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

from dam_lightning.cli import main
from dam_lightning.data import SynDigits


def print_config(args: list[str], capsys) -> dict:
    """The config the CLI resolves for ``args`` (``--print_config``), as a dict."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err[-2000:]
    return yaml.safe_load(captured.out)


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
