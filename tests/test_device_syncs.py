"""A GAM step never waits for the device except on the steps that log (issue 19).

Counted with a dispatch mode: reads of a tensor's value on the host (``.item()``, ``bool()``,
``nonzero``) are the device-to-host syncs that stall a GPU's queue. The NaN/inf guard records
the losses on the device and checks them on log steps, at an epoch's last batch and before
every checkpoint, still naming the loss, the batch and the step where it first happened. The
label-range check of source training does the same: a bad label is noted on the device, ignored
by the loss, and reported (its value) at the next check.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode

from dam_lightning.data import DomainAdaptationDataModule
from dam_lightning.errors import ConfigError, TrainingStopped
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule, SourceModule

from .conftest import quiet_trainer

READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host. Reads inside ``torch.optim`` are
    left out: optimisers keep their step counters on the CPU when the parameters are on a GPU
    (unless ``capturable``/``fused``), so those reads cost no device sync there."""

    def __init__(self):
        super().__init__()
        self.reads = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READS and not _inside_torch_optim():
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _inside_torch_optim() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if "/torch/optim/" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class CountingSyncs(GAMAdaptModule):
    """Counts host reads inside each training step, and which steps log progress-bar values."""

    def setup(self, stage: str) -> None:
        self.steps, self.progress_logged = [], set()

    def training_step(self, batch, batch_idx):
        adapting, reads_back = self.adapting, self.reads_back_this_step(batch_idx)
        with HostReads() as mode:
            super().training_step(batch, batch_idx)
        if adapting:
            self.steps.append((batch_idx, reads_back, sum(mode.reads.values())))

    def log(self, name, value, *args, prog_bar: bool = False, **kwargs):
        if prog_bar and self.adapting:
            self.progress_logged.add(self.trainer.fit_loop.epoch_loop.batch_idx)
        super().log(name, value, *args, prog_bar=prog_bar, **kwargs)


def test_a_gam_step_reads_nothing_back_unless_it_logs(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=16)
    module = CountingSyncs(LeNet, num_classes=10, layers={"fc3": 0.1, "fc4": 1.0}, source_steps=1)
    trainer = quiet_trainer(max_steps=1 + 2 * 9, log_every_n_steps=4)
    trainer.fit(module, dm)
    quiet = [reads for _, logs, reads in module.steps if not logs]
    checked = [batch for batch, logs, reads in module.steps if logs and reads]
    assert len(quiet) == 6 and set(quiet) == {0}
    # every 4th batch, and the fit's last: the guard and the progress bar read back
    assert checked == [3, 7, 9]
    assert module.progress_logged == {3, 7, 9}  # as CPU numbers: no .item() per step for the bar


class PoisonAt(GAMAdaptModule):
    """F_t's first weight turns NaN at training batch ``batch``: every loss after it is NaN."""

    poison_batch = 3

    def training_step(self, batch, batch_idx):
        if batch_idx == self.poison_batch:
            with torch.no_grad():
                next(self.target_net.parameters()).fill_(float("nan"))
        super().training_step(batch, batch_idx)


def test_a_nan_loss_between_checks_stops_at_the_next_check_naming_where_it_happened(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=16)
    module = PoisonAt(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=1)
    trainer = quiet_trainer(max_steps=1 + 2 * 9, log_every_n_steps=6)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.fit(module, dm)
    assert str(stopped.value).startswith(
        "the discriminator loss of layer fc4 (layer/fc4/loss_d) is nan at epoch 0, batch 3 "
        "(global step 5); training stopped at global step 11, the first check after it"
    )


def test_no_checkpoint_is_written_after_a_nan_loss_even_before_the_next_log_step(
    tiny_digits, tmp_path
):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=16)
    module = PoisonAt(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=1)
    # 1 source step, then 2 per GAM batch: the save at global step 7 follows batch 3's update
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=1 + 2 * 9, log_every_n_steps=50, enable_checkpointing=True,
        callbacks=[checkpoint],
    )  # fmt: skip
    with pytest.raises(TrainingStopped, match=r"is nan at epoch 0, batch 3 \(global step 5\)"):
        trainer.fit(module, dm)
    for path in tmp_path.glob("*.ckpt"):
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class BadLabelAt(SourceModule):
    """Counts host reads per training step; the labels of batch ``bad_batch`` get a 10."""

    bad_batch = 2

    def setup(self, stage: str) -> None:
        self.steps = []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.bad_batch:
            batch["source"][1][5] = 10
        reads_back = self.reads_back_this_step(batch_idx)
        with HostReads() as mode:
            loss = super().training_step(batch, batch_idx)
        self.steps.append((batch_idx, reads_back, sum(mode.reads.values())))
        return loss


def test_source_training_checks_labels_on_log_steps_only_and_before_every_checkpoint(
    tiny_digits, tmp_path
):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=16)
    module = BadLabelAt(LeNet, num_classes=10)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=12, log_every_n_steps=6, enable_checkpointing=True, callbacks=[checkpoint]
    )
    with pytest.raises(ConfigError, match=r"^source training batch: label 10 is outside 0\.\.9"):
        trainer.fit(module, dm)
    # batches 0-3 ran (none reading back), then the save after batch 3 found the bad label
    assert [(batch, reads) for batch, logs, reads in module.steps if not logs] == [
        (0, 0), (1, 0), (2, 0), (3, 0)
    ]  # fmt: skip
    assert not list(tmp_path.glob("*.ckpt"))  # no checkpoint holds the batch's update


def test_the_first_bad_label_is_kept_until_taken():
    from dam_lightning.modules.base import _FirstBadLabel

    first = _FirstBadLabel()
    assert first.take() is None
    for labels in ([1, 2], [3, 12, 11], [13]):
        labels = torch.tensor(labels)
        first.add(labels, labels < 10)
    assert first.take() == 12
    assert first.take() is None  # forgotten once taken
