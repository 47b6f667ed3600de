"""StageOverlays: a picture of the target predictions after each GAM stage, in the run folder.

At the milestones of ``AdaptationSummary`` (source only, after the first Gaussian matching, at
the end) it predicts the first few target validation images and writes one PNG per stage, and
at the end one PNG with every stage side by side, each with its rows named and a legend of the
class colours; a W&B run gets the same pictures. It only evaluates; it never changes a network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from torch import Tensor

from dam_lightning.callbacks.predictions import default_palette, save_png_atomically
from dam_lightning.callbacks.progress import logged_step
from dam_lightning.callbacks.summary import milestones_due
from dam_lightning.data.attributes import dataset_info
from dam_lightning.data.labels import IGNORE_COLOUR, colour_table
from dam_lightning.errors import ConfigError
from dam_lightning.matching import eval_mode
from dam_lightning.runs import run_directory

__all__ = ["StageOverlays", "colour_mask", "overlay", "render_figure", "stage_figure"]


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
    end (rows: image, ground truth, then the prediction of every stage). Each picture names its
    rows and has a legend of the class colours (names and palette: the target set's
    ``DatasetInfo``); with a ``WandbLogger`` each is also logged as ``overlays/<file name>``.

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

    def _classes(self, trainer) -> tuple[Sequence[str], Sequence[Sequence[int]]]:
        """Class names and colours from the target set's ``DatasetInfo`` (data/labels.py);
        the task's names and the default palette where it has none."""
        info = dataset_info(trainer.datamodule.target_val, None)
        names = (info.classes if info else None) or trainer.lightning_module.task.class_names
        palette = (info.palette if info else None) or default_palette(len(names))
        return names, palette

    @rank_zero_only
    def _write_stage(self, trainer, stage: str) -> None:
        images, labels = self._target_images(trainer)
        palette, predicted = self._classes(trainer)[1], self.stages[stage]
        rows = {
            "target image": [rgb_image(x) for x in images],
            "prediction overlaid": [
                overlay(x, p, palette) for x, p in zip(images, predicted, strict=True)
            ],
            "prediction": [colour_mask(p, palette) for p in predicted],
            "ground truth": [colour_mask(y, palette) for y in labels],
        }
        name = f"{len(self.stages)}_{re.sub(r'[^a-z0-9]+', '_', stage.lower()).strip('_')}"
        self._save(trainer, rows, name, f"Target predictions {stage}")

    @rank_zero_only
    def _write_all(self, trainer) -> None:
        images, labels = self._target_images(trainer)
        palette = self._classes(trainer)[1]
        rows = {
            "target image": [rgb_image(x) for x in images],
            "ground truth": [colour_mask(y, palette) for y in labels],
        }
        for stage, predicted in self.stages.items():
            rows[stage] = [colour_mask(p, palette) for p in predicted]
        self._save(trainer, rows, "stages", "Target predictions after each stage")

    def _save(self, trainer, rows: dict[str, list[np.ndarray]], name: str, title: str) -> None:
        """Write ``overlays/<name>.png`` and log it to W&B as ``overlays/<name>``."""
        names, palette = self._classes(trainer)
        picture = render_figure(stage_figure(rows, names, palette, self.scale, title))
        folder = os.path.join(run_directory(trainer), "overlays")
        os.makedirs(folder, exist_ok=True)
        save_png_atomically(Image.fromarray(picture), os.path.join(folder, f"{name}.png"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                image = wandb.Image(picture, caption=title)
                logger.log_metrics({f"overlays/{name}": image}, step=logged_step(trainer))

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


def tile_grid(rows: list[list[np.ndarray]], scale: int, gap: int = 2) -> np.ndarray:
    """Rows of equally sized (H, W, 3) uint8 tiles as one grid with white gaps, each tile
    magnified ``scale`` times (nearest neighbour).

    Example:
        >>> tile_grid([[np.zeros((1, 1, 3), np.uint8)] * 2], scale=2, gap=1).shape
        (2, 5, 3)
    """
    tiles = [[np.kron(t, np.ones((scale, scale, 1), np.uint8)) for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    shape = (len(tiles) * (h + gap) - gap, len(tiles[0]) * (w + gap) - gap, 3)
    grid = np.full(shape, 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = tile
    return grid


def stage_figure(
    rows: dict[str, list[np.ndarray]],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    scale: int = 3,
    title: str = "",
) -> Figure:
    """The tiles of each row side by side, each row named on the left, and a legend below that
    names each class's colour (and the colour of ignored pixels); about one screen pixel per
    magnified pixel.

    Example:
        >>> tile = np.zeros((4, 4, 3), np.uint8)
        >>> figure = stage_figure({"image": [tile], "truth": [tile]}, ["road", "sky"],
        ...                       [(128, 64, 128), (70, 130, 180)])
        >>> [t.get_text() for t in figure.axes[0].get_yticklabels()]
        ['image', 'truth']
        >>> [t.get_text() for t in figure.legends[0].get_texts()]
        ['road', 'sky', 'ignored']
    """
    gap = 2
    grid = tile_grid(list(rows.values()), scale, gap)
    tile_height = next(iter(rows.values()))[0].shape[0] * scale
    columns = min(len(class_names) + 1, 6)
    # Laid out in pixels, so that the picture is drawn at one screen pixel per pixel (a
    # layout engine would scale it): row names on the left, title above, legend below.
    left = 16 + 8 * max(len(name) for name in rows)
    top = 30 if title else 8
    bottom = 16 + 22 * -(-(len(class_names) + 1) // columns)
    width = max(left + grid.shape[1] + 8, 20 + 80 * columns)  # the legend's row fits too
    height = top + grid.shape[0] + bottom
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    axes = figure.add_axes(
        (left / width, bottom / height, grid.shape[1] / width, grid.shape[0] / height)
    )
    axes.imshow(grid, interpolation="nearest")
    centres = [i * (tile_height + gap) + tile_height / 2 for i in range(len(rows))]
    axes.set_yticks(centres, list(rows))
    axes.set_xticks([])
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if title:
        axes.set_title(title, fontsize="medium")
    swatches = [(name, colour) for name, colour in zip(class_names, palette, strict=False)]
    handles = [
        Patch(facecolor=np.asarray(colour) / 255, edgecolor="0.6", label=name)
        for name, colour in [*swatches, ("ignored", IGNORE_COLOUR)]
    ]
    figure.legend(handles=handles, loc="lower center", ncols=columns, fontsize="small",
                  frameon=False, borderaxespad=0.2)  # fmt: skip
    return figure


def render_figure(figure: Figure) -> np.ndarray:
    """A matplotlib figure drawn off-screen (Agg) as an (H, W, 3) uint8 RGB array.

    Example:
        >>> render_figure(Figure(figsize=(1, 1), dpi=10)).shape
        (10, 10, 3)
    """
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
