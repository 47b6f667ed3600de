"""ValidationDashboard: what a validation's numbers summarise, as pictures and a table.

After a validation run it logs the target set's confusion matrix as a picture, a per-class
table and, for segmentation, a fixed set of target images with their predicted and true masks:
to W&B as ``wandb.Image``/``wandb.Table``, to TensorBoard as images; other loggers get nothing
more than the metrics. The confusion matrix is the one the module's metrics have just computed
(no second pass over the set); only the few images shown are predicted again. It never changes
a network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from dam_lightning.callbacks.predictions import default_palette
from dam_lightning.callbacks.progress import logged_step
from dam_lightning.callbacks.stage_overlays import colour_mask, overlay, render_figure, rgb_image
from dam_lightning.data.attributes import dataset_info, unwrap
from dam_lightning.data.labels import IGNORE_INDEX
from dam_lightning.data.transforms import SegmentationTransform, resize_mask
from dam_lightning.errors import ConfigError, WrongTypeError
from dam_lightning.matching import eval_mode
from dam_lightning.metrics import class_accuracy, segmentation_scores
from dam_lightning.modules.base import EvaluatingModule

__all__ = [
    "ValidationDashboard",
    "confusion_figure",
    "per_class_table",
    "render_figure",
    "row_normalised",
]

PREFIX = "val/target"
"""The target validation set's prefix, shared with its metrics (``val/target/miou``)."""

ANNOTATED_CLASSES = 20
"""Up to this many classes the confusion picture writes every cell's percentage."""


def row_normalised(confmat: Tensor) -> Tensor:
    """Each row of a confusion matrix (rows = label) divided by its sum, in float64: where the
    labelled pixels (or images) of a class went. A class without labels is a row of NaN.

    Example:
        >>> row_normalised(torch.tensor([[3, 1], [0, 0]])).tolist()
        [[0.75, 0.25], [nan, nan]]
    """
    counts = confmat.double()
    return counts / counts.sum(dim=1, keepdim=True)


def per_class_table(
    confmat: Tensor, class_names: Sequence[str], task: str
) -> tuple[list[str], list[list]]:
    """Columns and rows of the per-class table of one confusion matrix (rows = label): for
    segmentation ``class, iou, accuracy, pixel_share``, for classification ``class, accuracy,
    image_share``. ``accuracy`` is the share of the class's labels predicted right; the share is
    the class's part of all labelled pixels (images). A class without labels has accuracy None,
    a class neither labelled nor predicted IoU None (NaN in the metrics).

    Example:
        >>> columns, rows = per_class_table(torch.tensor([[3, 1], [0, 0]]), ["road", "car"],
        ...                                 "segmentation")
        >>> columns
        ['class', 'iou', 'accuracy', 'pixel_share']
        >>> rows  # car: never labelled, predicted once: IoU 0, accuracy unknown
        [['road', 0.75, 0.75, 1.0], ['car', 0.0, None, 0.0]]
    """
    counts = confmat.double()
    labelled = counts.sum(dim=1)
    accuracy = class_accuracy(confmat).tolist()
    share = (labelled / labelled.sum()).tolist()
    if task == "segmentation":
        scores = segmentation_scores(confmat, class_names)
        iou = [scores[f"iou/{name}"].item() for name in class_names]
        columns = ["class", "iou", "accuracy", "pixel_share"]
        rows = [list(values) for values in zip(class_names, iou, accuracy, share, strict=True)]
    else:
        columns = ["class", "accuracy", "image_share"]
        rows = [list(values) for values in zip(class_names, accuracy, share, strict=True)]
    return columns, [[_number_or_none(v) for v in row] for row in rows]


def _number_or_none(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def confusion_figure(confmat: Tensor, class_names: Sequence[str], title: str = "") -> Figure:
    """The row-normalised confusion matrix as a heat map, labels down, predictions across,
    class names on both axes; rows of classes without labels grey. Up to
    ``ANNOTATED_CLASSES`` classes every cell shows its percentage.

    Example:
        >>> figure = confusion_figure(torch.tensor([[3, 1], [0, 2]]), ["road", "car"])
        >>> figure.axes[0].images[0].get_array().tolist()
        [[0.75, 0.25], [0.0, 1.0]]
    """
    normalised = row_normalised(confmat).numpy()
    count = len(class_names)
    side = 2.5 + 0.32 * count
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.subplots()
    cmap = colormaps["Blues"].with_extremes(bad="0.85")
    image = axes.imshow(np.ma.masked_invalid(normalised), cmap=cmap, vmin=0.0, vmax=1.0)
    ticks = range(count)
    axes.set_xticks(ticks, list(class_names), rotation=60, ha="right", fontsize="small")
    axes.set_yticks(ticks, list(class_names), fontsize="small")
    axes.set_xlabel("predicted")
    axes.set_ylabel("label")
    if title:
        axes.set_title(title, fontsize="medium")
    if count <= ANNOTATED_CLASSES:
        for (row, column), value in np.ndenumerate(normalised):
            if not math.isnan(value):
                colour = "white" if value > 0.5 else "black"
                axes.text(column, row, f"{100 * value:.0f}", ha="center", va="center",
                          fontsize=6 if count > 10 else 8, color=colour)  # fmt: skip
    figure.colorbar(image, ax=axes, label="share of the label's row", shrink=0.8)
    return figure


@dataclass
class MaskedImage:
    """One shown target image: the image in [0, 1] (3, H, W), the predicted and the true class
    ids at the image's size (H, W), and a name for its caption."""

    image: Tensor
    prediction: Tensor
    truth: Tensor
    name: str


@dataclass
class Dashboard:
    """What one validation shows: the confusion picture, the per-class table and (segmentation)
    the masked images, with the class names the masks' ids stand for."""

    confusion: np.ndarray
    columns: list[str]
    rows: list[list]
    class_names: tuple[str, ...]
    images: list[MaskedImage] = field(default_factory=list)
    palette: Sequence[Sequence[int]] = ()


class ValidationDashboard(L.Callback):
    """After every ``every_n_validations``-th validation run (the first one included; sanity
    checks never count), on rank 0, log for the target validation set:

    - ``val/target/confusion_matrix``: the confusion matrix, rows divided by their sums, class
      names on the axes (a picture);
    - ``val/target/per_class``: a table, one row per class: ``class, iou, accuracy,
      pixel_share`` (segmentation) or ``class, accuracy, image_share`` (classification);
    - ``val/target/masks`` (segmentation): the first ``num_images`` target validation images,
      the same at every validation, each with a ``prediction`` and a ``ground_truth`` mask
      whose class labels are the task's class names; ignored pixels (255) are labelled
      ``ignore`` in the ground truth, so they can be hidden in W&B's mask controls.

    W&B gets images and the table; TensorBoard the confusion picture and, per image,
    ``val/target/masks/<k>``: the image, the prediction overlaid and the true mask side by side
    in the dataset's palette; any other logger nothing (the metrics are already there).

    Args:
        num_images: how many target validation images to show (0: none).
        every_n_validations: log at every n-th validation run.

    Example:
        >>> ValidationDashboard(num_images=2, every_n_validations=5).every_n_validations
        5
    """

    def __init__(self, num_images: int = 4, every_n_validations: int = 1):
        if num_images < 0:
            raise ConfigError(f"ValidationDashboard: num_images must be >= 0, got {num_images}")
        if every_n_validations < 1:
            raise ConfigError(
                f"ValidationDashboard: every_n_validations must be >= 1, got {every_n_validations}"
            )
        self.num_images = num_images
        self.every_n_validations = every_n_validations
        self.validations = 0
        self._shown: list[tuple[Tensor, Tensor, str]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, EvaluatingModule):
            raise WrongTypeError(
                "ValidationDashboard needs a dam_lightning module (EvaluatingModule: it reads "
                f"its task, val_metrics and eval_net), not {type(pl_module).__name__}"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: callbacks run before the module's
        # epoch-end hook, which computes the metrics this reads.
        if not self._due(trainer):
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]
        if not (loggers and trainer.is_global_zero):
            return
        confmat = pl_module.task.confusion_matrix(pl_module.val_metrics["target"])
        if confmat is None or int(confmat.sum()) == 0:
            return  # nothing was scored (no target validation batches)
        dashboard = self.build(trainer, pl_module, confmat.cpu())
        for logger in loggers:
            publish(logger, dashboard, logged_step(trainer))

    def _due(self, trainer: L.Trainer) -> bool:
        """Count a validation run (sanity checks do not count); whether it is shown."""
        if trainer.sanity_checking:
            return False
        self.validations += 1
        return (self.validations - 1) % self.every_n_validations == 0

    def build(self, trainer: L.Trainer, pl_module: L.LightningModule, confmat: Tensor) -> Dashboard:
        """The pictures and the table of one validation, from its confusion matrix."""
        task = pl_module.task
        title = f"{PREFIX}, epoch {trainer.current_epoch}, step {logged_step(trainer)}"
        figure = confusion_figure(confmat, task.class_names, title)
        columns, rows = per_class_table(confmat, task.class_names, task.name)
        dashboard = Dashboard(render_figure(figure), columns, rows, task.class_names)
        dataset = getattr(trainer.datamodule, "target_val", None)
        if task.name == "segmentation" and self.num_images > 0 and dataset is not None:
            dashboard.images = self._masked_images(dataset, pl_module)
            info = dataset_info(dataset, None)
            palette = None if info is None else info.palette
            dashboard.palette = palette or default_palette(task.num_classes)
        return dashboard

    @torch.no_grad()
    def _masked_images(self, dataset, pl_module) -> list[MaskedImage]:
        """The fixed images with the current network's prediction, at the image's size, one
        image at a time (a validation set may mix image sizes), in the network's own dtype
        (``bf16-true`` keeps bf16 weights; callbacks run outside autocast)."""
        net = pl_module.eval_net
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
        shown = []
        with eval_mode(net):
            for image, truth, name in self._fixed_images(dataset):
                x = image.unsqueeze(0).to(pl_module.device, dtype)
                logits = pl_module.task.predict(net, x, image.shape[-2:])
                prediction = logits.argmax(dim=1)[0].cpu()
                shown.append(MaskedImage(displayable(image, dataset), prediction, truth, name))
        return shown

    def _fixed_images(self, dataset) -> list[tuple[Tensor, Tensor, str]]:
        """The first ``num_images`` items of the target validation set, read once: image,
        labels at the image's size (nearest, when the set keeps them at their native
        resolution) and name."""
        if self._shown is None:
            self._shown = []
            for index in range(min(self.num_images, len(dataset))):
                x, y = dataset[index]
                truth = _at_size(torch.as_tensor(y), x.shape[-2:])
                self._shown.append((x, truth, _item_name(dataset, index)))
        return self._shown

    def state_dict(self) -> dict:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validations = int(state_dict["validations"])


def publish(logger: Logger, dashboard: Dashboard, step: int) -> None:
    """Send a dashboard to a logger: W&B gets all of it, TensorBoard the pictures, any other
    logger nothing."""
    if isinstance(logger, WandbLogger):
        _publish_to_wandb(logger, dashboard, step)
    elif isinstance(logger, TensorBoardLogger):
        _publish_to_tensorboard(logger, dashboard, step)


def _publish_to_wandb(logger: WandbLogger, dashboard: Dashboard, step: int) -> None:
    import wandb

    payload = {
        f"{PREFIX}/confusion_matrix": wandb.Image(dashboard.confusion),
        f"{PREFIX}/per_class": wandb.Table(columns=dashboard.columns, data=dashboard.rows),
    }
    if dashboard.images:
        labels = dict(enumerate(dashboard.class_names))
        payload[f"{PREFIX}/masks"] = [
            wandb.Image(
                rgb_image(shown.image),
                masks={
                    "prediction": {"mask_data": _ids(shown.prediction), "class_labels": labels},
                    "ground_truth": {
                        "mask_data": _ids(shown.truth),
                        "class_labels": {**labels, IGNORE_INDEX: "ignore"},
                    },
                },
                caption=shown.name,
            )
            for shown in dashboard.images
        ]
    logger.log_metrics(payload, step=step)


def _publish_to_tensorboard(logger: TensorBoardLogger, dashboard: Dashboard, step: int) -> None:
    writer = logger.experiment
    writer.add_image(f"{PREFIX}/confusion_matrix", dashboard.confusion, step, dataformats="HWC")
    for k, shown in enumerate(dashboard.images):
        strip = np.concatenate(
            [
                rgb_image(shown.image),
                overlay(shown.image, shown.prediction, dashboard.palette),
                colour_mask(shown.truth, dashboard.palette),
            ],
            axis=1,
        )
        writer.add_image(f"{PREFIX}/masks/{k}", strip, step, dataformats="HWC")


def displayable(image: Tensor, dataset) -> Tensor:
    """A (3, H, W) network input as an image in [0, 1]: the dataset's normalisation (its
    transform's ``mean``/``std``, as ``SegmentationDataset`` has) undone, then clamped.

    Example:
        >>> displayable(torch.full((3, 1, 1), 2.0), None).flatten().tolist()
        [1.0, 1.0, 1.0]
    """
    transforms = (getattr(layer, "transform", None) for layer in unwrap(dataset))
    transform = next((t for t in transforms if isinstance(t, SegmentationTransform)), None)
    image = image.float()
    if transform is not None:
        std, mean = torch.tensor(transform.std), torch.tensor(transform.mean)
        image = image * std.view(-1, 1, 1) + mean.view(-1, 1, 1)
    return image.clamp(0, 1)


def _item_name(dataset, index: int) -> str:
    item_name = getattr(dataset, "item_name", None)
    return str(item_name(index)) if callable(item_name) else f"{index:06d}"


def _at_size(labels: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return resize_mask(labels, size).as_subclass(Tensor)


def _ids(labels: Tensor) -> np.ndarray:
    return labels.to(torch.uint8).numpy()
