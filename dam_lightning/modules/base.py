"""The part every dam_lightning LightningModule shares: the task, and evaluation per domain.

Validation/test batches come from ``DomainAdaptationDataModule.val_dataloader()`` as a list
``[target, source?]``; metrics are logged as ``val/target/<metric>`` (``acc`` for digits,
``miou``, ``pixel_acc``, ``iou/<class>``... for segmentation) and ``val/source/<metric>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dam_lightning.errors import WrongTypeError
from dam_lightning.modules.task import TaskName, make_task

NetworkFactory = Callable[[int], nn.Module]
"""Builds a network from ``num_classes``: a class such as ``LeNet`` or, in YAML, a
``class_path``/``init_args`` whose ``num_classes`` is filled in from the data."""

EVAL_DOMAINS = ("target", "source")
"""Order of the validation/test dataloaders: target first (the metric that matters)."""


class EvaluatingModule(L.LightningModule):
    """Base LightningModule: builds the task, evaluates ``eval_net`` per domain.

    Subclasses set ``eval_net`` (the network being judged) and implement training. The task
    arguments (``task``, ``class_names``, ``class_subsets``) come from the data module through
    CLI links, like ``num_classes``; from Python, pass them yourself.

    Args:
        num_classes: number of classes.
        task: ``"classification"`` or ``"segmentation"``.
        class_names: class names in index order (for per-class metric names).
        class_subsets: segmentation only: extra mIoUs over named subsets of the classes.
        class_weights: segmentation only: per-class weights of the supervised loss.
    """

    def __init__(
        self,
        num_classes: int,
        task: TaskName = "classification",
        class_names: Sequence[str] | None = None,
        class_subsets: Mapping[str, Sequence[str]] | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        self.task = make_task(task, num_classes, class_names, class_subsets, class_weights)
        self.val_metrics = nn.ModuleDict({d: self.task.metrics() for d in EVAL_DOMAINS})
        self.test_metrics = nn.ModuleDict({d: self.task.metrics() for d in EVAL_DOMAINS})

    needs_unused_parameter_search = False
    """Whether DDP must look for parameters a backward pass did not reach (the CLI then picks
    ``ddp_find_unused_parameters_true``)."""

    @property
    def eval_net(self) -> nn.Module:
        raise NotImplementedError

    def raise_together(self, error: Exception | None) -> None:
        """Raise ``error`` on every process at once: a check inside a step that fails on one
        DDP rank must stop all of them, or the others wait in their next collective until the
        process group's timeout (30 minutes by default) and print nothing useful.

        Every rank calls this at the same point of the step, with its own error or None: one
        tiny all-gather of a flag; only when some rank failed, its error is broadcast and every
        rank raises it, as ``rank <r>: <message>``. In one process it just raises ``error``."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if error is not None:
                raise error
            return
        failed = self.all_gather(torch.tensor(int(error is not None), device=self.device))
        if not bool(failed.any()):
            return
        first = int(failed.nonzero()[0])
        shared = self.trainer.strategy.broadcast(error, src=first)
        raise type(shared)(f"rank {first}: {shared}") from error

    def forward(self, x: Tensor) -> Tensor:
        return self.eval_net(x)

    # ---- validation and test: update per batch, compute and log once per epoch ------------------

    def _evaluation_step(self, batch, dataloader_idx: int, stage: str) -> None:
        x, y = batch
        domain = EVAL_DOMAINS[dataloader_idx]
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        where = f"{domain}_{'val' if stage == 'val' or domain == 'source' else 'test'} batch"
        self.task.update(metrics[domain], self.eval_net, x, y, where)

    def _log_evaluation(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        for domain in EVAL_DOMAINS[:count]:  # every rank, so the DDP reduction lines up
            metric = metrics[domain]
            values = metric.compute()  # summed across DDP ranks by torchmetrics
            metric.reset()
            self.log_dict(
                {f"{stage}/{domain}/{name}": value for name, value in values.items()},
                sync_dist=False,  # already reduced
                add_dataloader_idx=False,
            )
            if domain == "target":
                self.log(
                    self.task.headline, values[self.task.headline], prog_bar=True, logger=False
                )

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, dataloader_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # ---- predict: ids, confidence and (where known) labels, for PredictionWriter ---------------

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        x, y = _inputs_and_labels(batch)
        size = self.task.label_size(y) if y is not None else None
        probabilities = self.task.predict(self.eval_net, x, size).softmax(dim=1)
        confidence, prediction = probabilities.max(dim=1)
        return {"prediction": prediction, "confidence": confidence, "label": y}


def _inputs_and_labels(batch) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` from a labelled batch, ``(x, None)`` from an image-only one."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    raise WrongTypeError(
        f"a prediction batch must be images or (images, labels), got {type(batch).__name__}"
    )
