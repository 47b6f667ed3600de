"""The part every dam_lightning LightningModule shares: evaluation on the target and source domains.

Validation/test batches come from ``DomainAdaptationDataModule.val_dataloader()`` as a list
``[target, source?]``; metrics are logged as ``val/target/acc``, ``val/source/acc``.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch import Tensor, nn

from dam_lightning.modules.task import ClassificationTask

NetworkFactory = Callable[[int], nn.Module]
"""Builds a network from ``num_classes``: a class such as ``LeNet`` or, in YAML, a
``class_path``/``init_args`` whose ``num_classes`` is filled in from the data."""

EVAL_DOMAINS = ("target", "source")
"""Order of the validation/test dataloaders: target first (the metric that matters)."""


class EvaluatingModule(L.LightningModule):
    """Base LightningModule: builds the task, evaluates ``eval_net`` per domain.

    Subclasses set ``eval_net`` (the network being judged) and implement training.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.task = ClassificationTask(num_classes)
        self.val_metrics = nn.ModuleDict({d: self.task.metrics() for d in EVAL_DOMAINS})
        self.test_metrics = nn.ModuleDict({d: self.task.metrics() for d in EVAL_DOMAINS})

    @property
    def eval_net(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.eval_net(x)

    def _evaluation_step(self, batch, dataloader_idx: int, stage: str) -> None:
        x, y = batch
        domain = EVAL_DOMAINS[dataloader_idx]
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[domain]
        metrics.update(self(x), y)
        self.log_dict(
            {f"{stage}/{domain}/{name}": m for name, m in metrics.items()},
            on_step=False,
            on_epoch=True,
            add_dataloader_idx=False,
            prog_bar=domain == "target",
        )

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)
