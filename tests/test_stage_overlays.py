"""StageOverlays' pictures: rows named, a legend of the class colours of ``data/labels.py``; on
disk and in W&B. And what an offline W&B run of an adaptation holds besides the dashboard: the
source loss, the stage pictures and the Gaussian report as one table with a few scalars."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from dam_lightning.callbacks import AdaptationSummary, GaussianMatching, StageOverlays
from dam_lightning.callbacks.gaussian_matching import REPORT_COLUMNS
from dam_lightning.callbacks.stage_overlays import colour_mask, rgb_image, stage_figure
from dam_lightning.data.datamodule import DomainAdaptationDataModule
from dam_lightning.data.labels import DIGIT_SCENES_INFO, IGNORE_COLOUR
from dam_lightning.matching import foldable_layers
from dam_lightning.modules import GAMAdaptModule
from dam_lightning.runs import run_directory

from .conftest import quiet_trainer
from .test_dashboard import TinyEncoderNet, finished_offline_run, offline_wandb, wandb_history
from .toy_segmentation import CLASSES, Scenes

__all__ = ["offline_wandb"]  # the fixture, imported for the test below

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ("1_source_only", "2_after_gaussian_matching", "3_after_gam", "stages")


def test_a_stage_figure_names_its_rows_and_every_class_colour():
    info = DIGIT_SCENES_INFO
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, info.num_classes, (2, 8, 8), generator=generator)
    rows = {
        "target image": [rgb_image(torch.rand(3, 8, 8)) for _ in labels],
        "ground truth": [colour_mask(y, info.palette) for y in labels],
        "after GAM": [colour_mask(y, info.palette) for y in labels],
    }
    figure = stage_figure(rows, info.classes, info.palette, scale=3, title="after GAM")
    (axes,) = figure.axes
    assert [label.get_text() for label in axes.get_yticklabels()] == list(rows)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [*info.classes, "ignored"]
    colours = [tuple(np.rint(np.asarray(h.get_facecolor()[:3]) * 255).astype(int))
               for h in legend.legend_handles]  # fmt: skip
    assert colours == [*map(tuple, info.palette), IGNORE_COLOUR]
    # the tiles are drawn at one pixel per magnified pixel: 3 rows of 8 * 3 px and 2 px gaps
    assert figure.get_figheight() * figure.dpi >= 3 * 24 + 2 * 2


def test_an_offline_wandb_run_holds_source_loss_stage_pictures_and_one_gaussian_table(
    offline_wandb,
):
    module = GAMAdaptModule(
        TinyEncoderNet, num_classes=3, task="segmentation", class_names=CLASSES,
        layers={"encoder.2": 1.0, "output": 1.0}, gan_loss="lsgan", discriminator_width=8,
        source_steps=2,
    )  # fmt: skip
    data = DomainAdaptationDataModule(
        Scenes(8, (32, 64)), Scenes(8, (32, 64), seed=1, shift=0.5),
        target_val=Scenes(4, (32, 64), seed=2), batch_size=2, eval_batch_size=2,
    )  # fmt: skip
    logger = WandbLogger(project="dam-lightning-test", save_dir=str(offline_wandb), offline=True)
    trainer = quiet_trainer(
        max_steps=6, logger=logger, log_every_n_steps=1, default_root_dir=offline_wandb,
        callbacks=[GaussianMatching(calibration_batches=1), AdaptationSummary(),
                   StageOverlays(num_images=2, scale=1)],
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=data)
    finally:
        run = finished_offline_run(offline_wandb)
    history = wandb_history(run)
    logged = {key: value for row in history for key, value in row.items()}

    # stage 1's loss, batch by batch (Lightning repeats the last one in the epoch's later rows)
    source_loss = [row["train/source_loss"] for row in history if "train/source_loss" in row]
    assert len(source_loss) >= 2 and all(math.isfinite(v) for v in source_loss)
    assert source_loss[0] != source_loss[1]  # two batches, two values

    # the Gaussian report: four averaged gaps, the layer count and one table, not 4 keys a layer
    layers = foldable_layers(module.target_net)
    gaussian = sorted(key for key in logged if key.startswith("gaussian/"))
    assert gaussian == sorted(
        ["gaussian/per_layer", "gaussian/matched_layers"]
        + [f"gaussian/{gap}" for gap in REPORT_COLUMNS[1:]]
    )
    assert logged["gaussian/matched_layers"] == len(layers) == 3
    table = json.loads((run / "files" / logged["gaussian/per_layer"]["path"]).read_text())
    assert table["columns"] == list(REPORT_COLUMNS)
    assert [row[0] for row in table["data"]] == layers
    mean_after = sum(row[2] for row in table["data"]) / len(layers)
    assert logged["gaussian/mean_gap_after"] == pytest.approx(mean_after)

    # the stage pictures: on disk and, the same, in W&B
    folder = run_directory(trainer)
    for stage in STAGES:
        on_disk = np.asarray(Image.open(f"{folder}/overlays/{stage}.png").convert("RGB"))
        in_wandb = logged[f"overlays/{stage}"]
        assert in_wandb["_type"] == "image-file"
        shown = np.asarray(Image.open(run / "files" / in_wandb["path"]).convert("RGB"))
        assert np.array_equal(on_disk, shown), stage
