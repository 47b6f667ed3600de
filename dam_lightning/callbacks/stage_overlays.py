"""StageOverlays: a picture of the target predictions after each GAM stage, in the run folder.

At the milestones of ``AdaptationSummary`` (source only, after the first Gaussian matching, at
the end) it predicts the first few target validation images and writes one PNG per stage, and
at the end one PNG with every stage side by side. It only evaluates; it never changes a network.
"""

from __future__ import annotations

import os
import re

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor

from dam_lightning.callbacks.summary import milestones_due
from dam_lightning.callbacks.predictions import default_palette, save_png_atomically
from dam_lightning.data.labels import colour_table
from dam_lightning.errors import ConfigError
from dam_lightning.matching import eval_mode
from dam_lightning.runs import run_directory

__all__ = ["StageOverlays", "colour_mask", "overlay"]


def colour_mask(labels: Tensor, palette) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours of ``palette``; 255 (ignored) is black.

    Example:
        >>> colour_mask(torch.tensor([[0, 255]]), ((10, 20, 30),)).tolist()
        [[[10, 20, 30], [0, 0, 0]]]
    """
    return colour_table(tuple(palette))[labels.long().clamp(0, 255)].numpy()


def overlay(image: Tensor, labels: Tensor, palette, alpha: float = 0.6) -> np.ndarray:
    """A (3, H, W) image in [0, 1] with the class colours blended in at ``alpha`` (uint8 RGB).

    Example:
        >>> overlay(torch.zeros(3, 1, 1), torch.tensor([[0]]), ((200, 0, 0),), 0.5).tolist()
        [[[100, 0, 0]]]
    """
    rgb = image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0
    colours = colour_mask(labels, palette).astype(np.float32)
    return np.rint(rgb * (1 - alpha) + colours * alpha).astype(np.uint8)


class StageOverlays(L.Callback):
    """Write ``overlays/<n>_<stage>.png`` (rows: target image, prediction overlaid, prediction,
    ground truth; one column per image) at each milestone, and ``overlays/stages.png`` at the
    end (rows: image, ground truth, then the prediction of every stage).

    Args:
        num_images: how many target validation images (the first ones) to show.
        scale: nearest-neighbour magnification of the small scenes.
        final_label: name of the last stage (as ``AdaptationSummary``'s).

    Example:
        >>> StageOverlays(num_images=4).stages
        {}
    """

    def __init__(self, num_images: int = 8, scale: int = 3, final_label: str = "after GAM"):
        if num_images < 1 or scale < 1:
            raise ConfigError(
                f"StageOverlays: num_images and scale must be >= 1, got {num_images}, {scale}"
            )
        self.num_images, self.scale, self.final_label = num_images, scale, final_label
        self.stages: dict[str, Tensor] = {}
        self._images: tuple[Tensor, Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:  # rank 0 alone draws (and records) the stages
            return
        for stage, net in milestones_due(pl_module, self.stages):
            self._record(trainer, pl_module, stage, net)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module, self.final_label, pl_module.target_net)
        self._write_all(trainer)

    def _target_images(self, trainer) -> tuple[Tensor, Tensor]:
        if self._images is None:
            dataset = trainer.datamodule.target_val
            items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
            self._images = (
                torch.stack([x for x, _ in items]),
                torch.stack([torch.as_tensor(y) for _, y in items]),
            )
        return self._images

    @torch.no_grad()
    def _record(self, trainer, pl_module, stage: str, net) -> None:
        if not trainer.is_global_zero:
            return
        images, labels = self._target_images(trainer)
        with eval_mode(net):
            logits = pl_module.task.predict(net, images.to(pl_module.device), labels.shape[-2:])
        self.stages[stage] = logits.argmax(dim=1).cpu()
        self._write_stage(trainer, stage)

    def _palette(self, trainer):
        dataset = trainer.datamodule.target_val
        palette = getattr(dataset, "palette", None)
        return palette or default_palette(trainer.lightning_module.num_classes)

    @rank_zero_only
    def _write_stage(self, trainer, stage: str) -> None:
        images, labels = self._target_images(trainer)
        palette, predicted = self._palette(trainer), self.stages[stage]
        rows = [
            [rgb_image(x) for x in images],
            [overlay(x, p, palette) for x, p in zip(images, predicted, strict=True)],
            [colour_mask(p, palette) for p in predicted],
            [colour_mask(y, palette) for y in labels],
        ]
        name = f"{len(self.stages)}_{re.sub(r'[^a-z0-9]+', '_', stage.lower()).strip('_')}.png"
        self._save(trainer, rows, name)

    @rank_zero_only
    def _write_all(self, trainer) -> None:
        images, labels = self._target_images(trainer)
        palette = self._palette(trainer)
        rows = [[rgb_image(x) for x in images], [colour_mask(y, palette) for y in labels]]
        rows += [[colour_mask(p, palette) for p in pred] for pred in self.stages.values()]
        self._save(trainer, rows, "stages.png")

    def _save(self, trainer, rows: list[list[np.ndarray]], name: str) -> None:
        gap = 2
        tiles = [
            [np.kron(t, np.ones((self.scale, self.scale, 1), np.uint8)) for t in r] for r in rows
        ]
        h, w = tiles[0][0].shape[:2]
        grid = np.full(
            (len(tiles) * (h + gap) - gap, len(tiles[0]) * (w + gap) - gap, 3), 255, np.uint8
        )
        for i, row in enumerate(tiles):
            for j, tile in enumerate(row):
                grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = tile
        folder = os.path.join(run_directory(trainer), "overlays")
        os.makedirs(folder, exist_ok=True)
        save_png_atomically(Image.fromarray(grid), os.path.join(folder, name))

    def state_dict(self) -> dict:
        return {"stages": self.stages}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stages = dict(state_dict["stages"])


def rgb_image(image: Tensor) -> np.ndarray:
    """A (3, H, W) image in [0, 1] as (H, W, 3) uint8 RGB (values outside [0, 1] clamped).

    Example:
        >>> rgb_image(torch.tensor([[[0.5]], [[2.0]], [[-1.0]]])).tolist()
        [[[128, 255, 0]]]
    """
    return np.rint(image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
