"""GAM on ERFNet for segmentation: bf16 on the CPU, Gaussian matching first, the summary table."""

from __future__ import annotations

import math

import pytest
import torch

from dam_lightning.callbacks import AdaptationSummary, GaussianMatching
from dam_lightning.data.datamodule import DomainAdaptationDataModule
from dam_lightning.models import ERFNet
from dam_lightning.modules import GAMAdaptModule

from .conftest import quiet_trainer
from .toy_segmentation import CLASSES, Scenes


def _small_erfnet(num_classes: int) -> ERFNet:
    return ERFNet(num_classes, width=0.25, dropout=0, example_input_shape=(3, 32, 64))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_a_few_gam_steps_on_erfnet_stay_finite_and_report_segmentation_metrics(precision, tmp_path):
    module = GAMAdaptModule(
        _small_erfnet,
        num_classes=3,
        task="segmentation",
        class_names=CLASSES,
        layers={**{name: 1.0 for name in ERFNet.PAPER_LAYERS.values()}, "output": 1.0},
        adversarial_weight=0.1,
        gan_loss="lsgan",
        drift_reduction="sum",
        discriminator_width=16,
        source_steps=3,
    )
    data = DomainAdaptationDataModule(
        Scenes(8, (32, 64)), Scenes(8, (32, 64), seed=1, shift=0.5), batch_size=2
    )
    summary = AdaptationSummary()
    trainer = quiet_trainer(
        max_steps=9,  # 3 source steps, then 3 batches of D + G
        precision=precision,
        log_every_n_steps=1,  # the activation gaps are measured only when logs are written
        default_root_dir=tmp_path,
        callbacks=[GaussianMatching(calibration_batches=1, mode="layerwise"), summary],
    )
    trainer.fit(module, datamodule=data)
    for key in ("train/loss_g", "train/drift", "layer/output/loss_d", "layer/output/mean_gap"):
        assert math.isfinite(trainer.callback_metrics[key].item()), key
    assert list(summary.rows) == ["source only", "after Gaussian matching", "after GAM"]
    row = summary.rows["after GAM"]
    assert {"pixel_acc", "class_acc", "miou", "worst_class_iou", "iou/car"} <= set(row)
    assert all(math.isfinite(row[k]) for k in ("pixel_acc", "miou"))
    table = (tmp_path / "summary.md").read_text()
    assert "miou" in table and "iou/car" not in table  # per-class values go to summary.json
    assert "iou/car" in (tmp_path / "summary.json").read_text()
    # F_t's BatchNorm statistics stay frozen: Gaussian matching (fold) leaves them as F_s's
    for name, buffer in module.target_net.named_buffers():
        if "running" in name:
            assert torch.equal(buffer, module.source_net.get_buffer(name)), name


@pytest.mark.slow
def test_two_process_ddp_on_erfnet_leaves_identical_weights_and_scores_every_image_once(tmp_path):
    import os
    import subprocess
    import sys

    import torch
    from torch.utils.data import DataLoader

    from .conftest import REPO

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_segmentation_run.py"), str(tmp_path),
         "one_pass"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    module = GAMAdaptModule(
        _small_erfnet, num_classes=3, task="segmentation", class_names=CLASSES,
        layers={"encoder.layers.6": 1.0, "output": 1.0}, discriminator_width=8,
    )  # fmt: skip
    module.load_state_dict({k: v for k, v in rank0.items() if k != "val/target/miou"})
    loader = DataLoader(Scenes(7, (32, 64), seed=2, shift=0.5), batch_size=3)
    expected = module.task.evaluate(module.target_net, loader, torch.device("cpu"))["miou"]
    assert rank0["val/target/miou"].item() == pytest.approx(expected, abs=1e-6)
    source = {k.replace("source_net.", "target_net."): v
              for k, v in rank0.items() if k.startswith("source_net.")}  # fmt: skip
    moved = [k for k in rank0 if k.startswith("target_net.") and k.endswith("weight")
             and not torch.equal(rank0[k], source[k])]  # fmt: skip
    assert moved, "the target network did not change"


def test_a_tap_on_batchnorm_follows_the_syncbatchnorm_that_replaces_it(tmp_path):
    """Trainer(sync_batchnorm=True) swaps every BatchNorm for a SyncBatchNorm when DDP starts,
    after the module built its taps: the discriminator of a BatchNorm layer must still receive
    that layer's activation (from the SyncBatchNorm that now runs)."""
    layer = "encoder.initial_block.bn"
    module = GAMAdaptModule(
        _small_erfnet, num_classes=3, task="segmentation", class_names=CLASSES,
        layers={layer: 1.0, "output": 1.0}, gan_loss="lsgan", discriminator_width=8,
        source_steps=1,
    )  # fmt: skip
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place, as Lightning applies it
    assert isinstance(module.target_net.get_submodule(layer), torch.nn.SyncBatchNorm)
    received = []
    discriminator = module.discriminators[layer.replace(".", "__")]
    discriminator.register_forward_pre_hook(lambda _, args: received.append(args[0].shape))
    data = DomainAdaptationDataModule(
        Scenes(4, (32, 64)), Scenes(4, (32, 64), seed=1, shift=0.5), batch_size=2
    )
    quiet_trainer(max_steps=5, default_root_dir=tmp_path).fit(module, datamodule=data)
    # 1 source batch, then 2 adaptation batches: D sees F_s's and F_t's activation, G F_t's
    assert len(received) == 2 * 3
    assert all(shape[1] == module.target_net.get_submodule(layer).num_features
               for shape in received)  # fmt: skip


@pytest.mark.slow
def test_two_process_segmentation_run_resumed_mid_epoch_ends_as_the_uninterrupted_one(tmp_path):
    """2 DDP processes, ERFNet, patch discriminators, Gaussian matching at every epoch start:
    killed after a checkpoint in the middle of an epoch and resumed from it, the run ends with
    the very weights of the uninterrupted one (the data module resumes its loaders there)."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}

    def run(outdir, *resume):
        outdir.mkdir()
        result = subprocess.run(
            [sys.executable, str(REPO / "tests" / "ddp_segmentation_run.py"), str(outdir),
             "one_pass", *resume],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        return torch.load(outdir / "rank0.pt"), torch.load(outdir / "rank1.pt")

    straight = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoints" / "step=9.ckpt"
    assert checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # inside epoch 1
    resumed = run(tmp_path / "resumed", str(checkpoint))
    for rank in (0, 1):
        different = [
            k for k in straight[rank] if not torch.equal(straight[rank][k], resumed[rank][k])
        ]
        assert different == [], (rank, different[:5])
