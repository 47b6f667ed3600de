"""What is specific to the prediction task (loss, metrics, evaluation), kept out of the modules.

Digit classification is the task today; segmentation (mIoU on a confusion matrix) plugs in here
with the same three methods. Nothing here trains or logs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores


class WorstClassAccuracy(MulticlassStatScores):
    """The accuracy of the class the network gets most wrong: min over classes of
    (correct predictions of the class) / (images of the class), over the classes present.

    Adversarial adaptation can score well overall while it maps one whole target class onto
    another (on USPS->MNIST, 7s predicted as 9s); micro accuracy hides that, this shows it.

    Example:
        >>> metric = WorstClassAccuracy(num_classes=3)
        >>> metric.update(torch.eye(3)[[0, 0, 1, 2]], torch.tensor([0, 0, 1, 1]))
        >>> metric.compute().item()  # class 1: one of two right; class 2 has no images
        0.5
    """

    def __init__(self, num_classes: int):
        super().__init__(num_classes, average=None, validate_args=False)

    def compute(self) -> Tensor:
        stats = super().compute()  # per class: tp, fp, tn, fn, support
        correct, images = stats[:, 0], stats[:, 4]
        present = images > 0
        if not present.any():
            return torch.tensor(0.0, device=stats.device)
        return (correct[present].float() / images[present]).min()


class ClassificationTask:
    """Image classification: cross-entropy loss, micro accuracy (the paper's digits metric) and
    the worst class's accuracy (which shows one class being mapped onto another).

    Example:
        >>> task = ClassificationTask(num_classes=3)
        >>> logits, labels = torch.eye(3), torch.tensor([0, 1, 1])
        >>> m = task.metrics(); m.update(logits, labels); round(m.compute()["acc"].item(), 4)
        0.6667
    """

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Supervised loss on labelled source data."""
        return F.cross_entropy(logits, labels)

    def metrics(self) -> MetricCollection:
        """Fresh metric objects for one domain's evaluation."""
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(self.num_classes, average="micro", validate_args=False),
                "worst_class_acc": WorstClassAccuracy(self.num_classes),
            }
        )

    def check_labels(self, labels: Tensor, where: str) -> None:
        """Raise a clear error when labels fall outside ``0..num_classes-1``."""
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(
                f"{where}: label {bad} is outside 0..{self.num_classes - 1}; check the dataset "
                "or set num_classes to match it"
            )

    @torch.no_grad()
    def evaluate(
        self, net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
    ) -> dict[str, float]:
        """Metrics of ``net`` over labelled batches, in eval mode (the mode is restored after)."""
        was_training = net.training
        net.eval()
        metrics = self.metrics().to(device)
        try:
            for x, y in batches:
                metrics.update(net(x.to(device)), y.to(device))
        finally:
            net.train(was_training)
        return {name: value.item() for name, value in metrics.compute().items()}
