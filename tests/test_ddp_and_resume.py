"""Distributed and interrupted runs give the results of a plain, uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dam_lightning.callbacks import AdaptationSummary, GaussianMatching
from dam_lightning.data import DomainAdaptationDataModule, UCIDigits
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule

from .conftest import REPO, quiet_trainer


def _two_process_run(outdir, *args: str) -> tuple[dict, dict]:
    outdir.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_run.py"), str(outdir), *args],
        cwd=outdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(outdir / "rank0.pt"), torch.load(outdir / "rank1.pt")


@pytest.mark.slow
def test_two_process_cpu_ddp_leaves_identical_weights_on_both_ranks(tmp_path):
    rank0, rank1 = _two_process_run(tmp_path / "run")
    assert rank0.keys() == rank1.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert different == []
    # validation metrics are synced over both ranks and count every target image exactly once
    module = GAMAdaptModule(LeNet, num_classes=10)
    ignored = ("val/target/acc", "gradient_bytes_per_gam_batch")
    module.load_state_dict({k: v for k, v in rank0.items() if k not in ignored})
    target = torch.utils.data.Subset(UCIDigits(), range(255))
    loader = torch.utils.data.DataLoader(target, batch_size=64)
    expected = module.task.evaluate(module.target_net, loader, torch.device("cpu"))["acc"]
    assert rank0["val/target/acc"].item() == pytest.approx(expected, abs=1e-6)
    moved = [
        k
        for k in rank0
        if k.startswith("target_net.")
        and not torch.equal(rank0[k], rank0[k.replace("target_net.", "source_net.")])
    ]
    assert moved, "the target network did not train"

    # Each backward reduces only the stepped network's gradients: D's and F_t's once per GAM
    # batch (DDP's default all-reduce: every bucket at both backwards, F_s's too, as the fit
    # trained it), to the same weights as DDP's default all-reduce.
    default, _ = _two_process_run(tmp_path / "default", "default")
    trainable = sum(p.numel() for net in (module.discriminators, module.target_net)
                    for p in net.parameters())  # fmt: skip
    ratio = rank0["gradient_bytes_per_gam_batch"].item() / (4 * trainable)
    default_ratio = default["gradient_bytes_per_gam_batch"].item() / (4 * trainable)
    assert ratio <= 1.05 and default_ratio > 2, (ratio, default_ratio)
    assert rank1["gradient_bytes_per_gam_batch"] == rank0["gradient_bytes_per_gam_batch"]
    for name, value in default.items():
        if name != "gradient_bytes_per_gam_batch":
            torch.testing.assert_close(rank0[name], value, msg=name)


def _fit(module, dm, root, max_epochs, ckpt_path=None):
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}")
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[GaussianMatching(calibration_batches=2), AdaptationSummary(), checkpoint],
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("stop_after_epoch", [0, 1], ids=["in-stage-1", "after-hand-over"])
def test_resume_continues_exactly(tiny_digits, tmp_path, stop_after_epoch):
    """Stage 1 (5 source batches) spans epochs 0 and 1 (3 batches each); a run killed in
    stage 1 or just after the hand-over resumes to the very weights of the uninterrupted run."""
    source, target = tiny_digits

    def new_module():
        L.seed_everything(0)
        return GAMAdaptModule(LeNet, num_classes=10, source_steps=5)

    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    straight = new_module()
    _fit(straight, dm, tmp_path / "straight", max_epochs=4)

    interrupted = new_module()
    _fit(interrupted, dm, tmp_path / "interrupted", max_epochs=stop_after_epoch + 1)
    assert interrupted.adapting == (stop_after_epoch == 1)
    resumed = GAMAdaptModule(LeNet, num_classes=10, source_steps=5)
    trainer = _fit(
        resumed,
        dm,
        tmp_path / "resumed",
        max_epochs=4,
        ckpt_path=tmp_path / "interrupted" / f"epoch={stop_after_epoch}.ckpt",
    )

    assert trainer.global_step == 5 + (4 * 3 - 5) * 2  # 5 source steps, then D + G per batch
    expected = straight.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} differs after resuming"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("nan", "TrainingStopped: rank 1: the discriminator loss of layer fc3 (layer/fc3/loss_d) "
                "is nan at epoch 0, batch 2"),
        ("label", "ConfigError: rank 1: source training batch: label 99 is outside 0..9"),
    ],
)  # fmt: skip
def test_a_failure_on_one_rank_stops_every_rank_with_the_same_line(what, message, tmp_path):
    """Only rank 1 meets the bad batch; without agreement rank 0 would wait in its next
    collective until the process group's timeout (30 minutes)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_failure_run.py"), what],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    out = result.stdout  # the two processes' lines may interleave
    assert out.count("[rank 0] ") == out.count("[rank 1] ") == 1, out[-3000:]
    assert out.count(message) == 2, out[-3000:]
