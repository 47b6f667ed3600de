"""What differs between classification and segmentation, kept out of the modules.

A task owns the supervised loss, the prediction an evaluation scores (segmentation: logits
upsampled to the label's size), the metric collection, and ``evaluate`` — the one evaluation path
that validation, the adaptation summary and the benchmarks all go through. Nothing here trains
or logs. The modules build their task with ``make_task`` from what the data module says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from dam_lightning.data.labels import IGNORE_INDEX
from dam_lightning.errors import ConfigError
from dam_lightning.matching import eval_mode
from dam_lightning.metrics import SegmentationMetrics, class_accuracy

TaskName = Literal["classification", "segmentation"]


class WorstClassAccuracy(MulticlassConfusionMatrix):
    """The accuracy of the class the network gets most wrong: min over classes of
    (correct predictions of the class) / (images of the class), over the classes present.

    Adversarial adaptation can score well overall while it maps one whole target class onto
    another (on USPS->MNIST, 7s predicted as 9s); micro accuracy hides that, this shows it.
    It is computed from a confusion matrix (``confmat``, rows = label, columns = prediction),
    which ``compute()`` keeps as ``computed_confmat`` for pictures of it (as
    ``SegmentationMetrics`` does).

    Example:
        >>> metric = WorstClassAccuracy(num_classes=3)
        >>> metric.update(torch.eye(3)[[0, 0, 1, 2]], torch.tensor([0, 0, 1, 1]))
        >>> metric.compute().item()  # class 1: one of two right; class 2 has no images
        0.5
        >>> metric.computed_confmat.tolist()
        [[2, 0, 0], [0, 1, 1], [0, 0, 0]]
    """

    def __init__(self, num_classes: int):
        super().__init__(num_classes, validate_args=False)
        self.computed_confmat: Tensor | None = None

    def compute(self) -> Tensor:
        self.computed_confmat = self.confmat.clone()  # summed across DDP ranks in compute()
        accuracy = class_accuracy(self.confmat)  # NaN for a class without images
        present = ~accuracy.isnan()
        if not present.any():
            return torch.tensor(0.0, device=self.confmat.device)
        return accuracy[present].min().float()


class Task:
    """The shared part of both tasks: label checks, prediction and the evaluation loop.

    Subclasses set ``name``, ``headline`` (the metric shown in the progress bar),
    ``summary_columns`` (the metrics of the adaptation summary table) and implement ``loss``
    and ``metrics``.
    """

    name: str
    headline: str
    summary_columns: tuple[str, ...]

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(
                f"{len(class_names)} class names for num_classes={num_classes}: {list(class_names)}"
            )
        self.num_classes = num_classes
        self.class_names = tuple(class_names or (str(c) for c in range(num_classes)))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Supervised loss on labelled source data."""
        raise NotImplementedError

    def metrics(self) -> Metric | MetricCollection:
        """Fresh metric state for one domain's evaluation; ``compute()`` returns a dict."""
        raise NotImplementedError

    def predict(self, net: nn.Module, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """The logits an evaluation scores; ``size`` is the label's spatial size, if any."""
        return net(x)

    def label_size(self, labels: Tensor) -> tuple[int, ...] | None:
        """The spatial size predictions must have to be scored against ``labels``."""
        return None

    def confusion_matrix(self, metrics) -> Tensor | None:
        """The ``(C, C)`` confusion matrix (rows = label, columns = prediction) that the last
        ``compute()`` of ``metrics`` (made by ``self.metrics()``) scored, summed across DDP
        ranks; None before the first ``compute()``. It survives ``reset()``, so it can be read
        after a validation epoch has been logged."""
        raise NotImplementedError

    def check_labels(self, labels: Tensor, where: str) -> None:
        """Raise a clear error when labels fall outside ``0..num_classes-1`` (and the ignore
        value, for segmentation)."""
        error = self.label_error(labels, where)
        if error is not None:
            raise error

    ignored_label = -100
    """The label value the loss skips (``F.cross_entropy``'s default ``ignore_index``)."""

    def valid_labels(self, labels: Tensor) -> Tensor:
        """Per label, whether it is a class index."""
        return (labels >= 0) & (labels < self.num_classes)

    def label_error(self, labels: Tensor, where: str) -> ConfigError | None:
        """The error ``check_labels`` would raise, or None (for checks that raise together
        across DDP ranks, ``EvaluatingModule.raise_together``)."""
        valid = self.valid_labels(labels)
        if labels.numel() and not bool(valid.all()):
            return self.bad_label_error(labels[~valid][0].item(), where)
        return None

    def bad_label_error(self, bad: int, where: str) -> ConfigError:
        """The error for label value ``bad``, found in ``where``."""
        ignore = f" or {IGNORE_INDEX} (ignored)" if self.name == "segmentation" else ""
        return ConfigError(
            f"{where}: label {bad} is outside 0..{self.num_classes - 1}{ignore} "
            f"(num_classes={self.num_classes}); labels must be class indices counted from 0 "
            "(e.g. remap 1..10 to 0..9), or the dataset's num_classes is wrong"
        )

    def update(
        self, metrics, net: nn.Module, x: Tensor, labels: Tensor, where: str = "evaluation batch"
    ) -> None:
        """Score one labelled batch: check its labels (``where`` names it in the error),
        predict at the labels' size, update ``metrics``."""
        self.check_labels(labels, where)
        metrics.update(self.predict(net, x, self.label_size(labels)), labels.long())

    @torch.no_grad()
    def evaluate(
        self,
        net: nn.Module,
        batches: Iterable[tuple[Tensor, Tensor]],
        device: torch.device,
        where: str = "evaluation batch",
    ) -> dict[str, float]:
        """Metrics of ``net`` over labelled batches, in eval mode; every submodule's own mode is
        restored after (``net.train()`` would also wake layers kept in eval mode on purpose,
        such as F_t's frozen BatchNorms). ``where`` names the batches in a bad-label error."""
        metrics = self.metrics().to(device)
        with eval_mode(net):
            for x, y in batches:
                self.update(metrics, net, x.to(device), y.to(device), where)
        return {name: float(value) for name, value in metrics.compute().items()}


class ClassificationTask(Task):
    """Image classification: cross-entropy loss, micro accuracy (the paper's digits metric) and
    the worst class's accuracy (which shows one class being mapped onto another).

    Example:
        >>> task = ClassificationTask(num_classes=3)
        >>> logits, labels = torch.eye(3), torch.tensor([0, 1, 1])
        >>> m = task.metrics(); m.update(logits, labels); round(m.compute()["acc"].item(), 4)
        0.6667
    """

    name = "classification"
    headline = "acc"
    summary_columns = ("acc", "worst_class_acc")

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(self.num_classes, average="micro", validate_args=False),
                "worst_class_acc": WorstClassAccuracy(self.num_classes),
            }
        )

    def confusion_matrix(self, metrics: MetricCollection) -> Tensor | None:
        return metrics["worst_class_acc"].computed_confmat


class SegmentationTask(Task):
    """Semantic segmentation: pixel-wise cross-entropy ignoring label 255 (optionally class
    weighted), logits upsampled bilinearly to the label's size before scoring, and the
    confusion-matrix metrics of ``dam_lightning.metrics`` (pixel accuracy, mean class accuracy,
    mIoU, per-class IoU, class-subset mIoUs).

    Args:
        num_classes: number of classes (19 for Cityscapes).
        class_names: names in class-index order (``iou/<name>`` keys).
        class_subsets: extra mIoUs over named class subsets, e.g. SYNTHIA's ``{"16": [...]}``.
        class_weights: per-class loss weights (ERFNet's recipe: 1 / ln(1.10 + p_class)).

    Example:
        >>> task = SegmentationTask(3, ["road", "car", "sky"])
        >>> logits = torch.zeros(1, 3, 2, 2); logits[:, 1] = 1  # "car" everywhere, at 2x2
        >>> task.predict(lambda x: logits, None, size=(4, 4)).shape
        torch.Size([1, 3, 4, 4])
        >>> task.loss(logits, torch.tensor([[[1, 255], [255, 255]]])) < 0.6
        tensor(True)
    """

    name = "segmentation"
    ignored_label = IGNORE_INDEX
    headline = "miou"
    summary_columns = ("pixel_acc", "class_acc", "miou", "worst_class_iou")

    def valid_labels(self, labels: Tensor) -> Tensor:
        """Per label, whether it is a class index or the ignore value (255)."""
        return super().valid_labels(labels) | (labels == IGNORE_INDEX)

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        class_subsets: Mapping[str, Sequence[str]] | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, class_names)
        self.class_subsets = {k: tuple(v) for k, v in (class_subsets or {}).items()}
        if class_weights is not None and len(class_weights) != num_classes:
            raise ConfigError(
                f"class_weights has {len(class_weights)} entries for {num_classes} classes"
            )
        self.class_weights = None if class_weights is None else torch.tensor(class_weights)
        self.summary_columns = SegmentationTask.summary_columns + tuple(
            column
            for key in self.class_subsets
            for column in (f"miou_{key}", f"miou_{key}_subset_only")  # both conventions
        )

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = _resize_logits(logits, labels.shape[-2:])
        weight = None if self.class_weights is None else self.class_weights.to(logits)
        return F.cross_entropy(logits, labels.long(), weight=weight, ignore_index=IGNORE_INDEX)

    def predict(self, net: nn.Module, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        logits = net(x)
        return logits if size is None else _resize_logits(logits, size)

    def label_size(self, labels: Tensor) -> tuple[int, ...]:
        return tuple(labels.shape[-2:])

    def metrics(self) -> SegmentationMetrics:
        return SegmentationMetrics(self.class_names, self.class_subsets)

    def confusion_matrix(self, metrics: SegmentationMetrics) -> Tensor | None:
        return metrics.computed_confmat


def _resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling of (N, C, h, w) logits to ``size`` (the standard protocol)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def make_task(
    task: TaskName,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    class_subsets: Mapping[str, Sequence[str]] | None = None,
    class_weights: Sequence[float] | None = None,
) -> Task:
    """The task object for a module's ``task`` argument (which the CLI links from the data).

    Example:
        >>> make_task("segmentation", 19).headline
        'miou'
    """
    if task == "classification":
        if class_subsets or class_weights:
            raise ConfigError("class_subsets and class_weights are for segmentation only")
        return ClassificationTask(num_classes, class_names)
    if task == "segmentation":
        return SegmentationTask(num_classes, class_names, class_subsets, class_weights)
    raise ConfigError(f"unknown task {task!r}: use 'classification' or 'segmentation'")
