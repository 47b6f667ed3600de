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
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

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
        self.gradient_reduction: ActiveGradientReduction | None = None
        self._first_bad_label = _FirstBadLabel()

    train_domains: tuple[str, ...] = ("source",)
    """Which domains' batches training reads: ``DomainDataModule.train_dataloader`` serves
    exactly these (``data.datamodule.FedModule`` names this seam). GAM sets both."""

    @property
    def uses_source_labels(self) -> bool:
        """Whether this fit's training reads source labels (the data module then decodes
        them); GAM reads them only while it trains F_s."""
        return True

    needs_unused_parameter_search = False
    """Whether DDP must look for parameters a backward pass did not reach (the CLI then picks
    ``ddp_find_unused_parameters_true``)."""

    @property
    def eval_net(self) -> nn.Module:
        raise NotImplementedError

    def raise_together(self, error: Exception | None, when: tuple[int, int] = (0, 0)) -> None:
        """Raise ``error`` on every process at once: a check inside a step that fails on one
        DDP rank must stop all of them, or the others wait in their next collective until the
        process group's timeout (30 minutes by default) and print nothing useful.

        Every rank calls this at the same point of the step, with its own error or None: one
        tiny all-gather of a flag and of ``when`` (a sortable position, e.g. (step, index of
        the loss)); only when some rank failed, the error of the rank whose failure came first
        (the lowest rank among equals) is broadcast and every rank raises it, as
        ``rank <r>: <message>``. In one process it just raises ``error``."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if error is not None:
                raise error
            return
        flag = torch.tensor([int(error is not None), *when], device=self.device)
        gathered = self.all_gather(flag).tolist()  # read back: the ranks decide together
        failed = [(tuple(w), rank) for rank, (f, *w) in enumerate(gathered) if f]
        if not failed:
            return
        first = min(failed)[1]
        shared = self.trainer.strategy.broadcast(error, src=first)
        raise type(shared)(f"rank {first}: {shared}") from error

    def reads_back_this_step(self, batch_idx: int) -> bool:
        """Whether this training batch may read values back from the device (a sync that
        stalls a GPU's queue): when Lightning writes logs (every ``log_every_n_steps`` batches),
        at an epoch's last batch and near ``max_steps`` (within one optimiser step per
        optimiser: the fit's last batch among them); the same answer on every DDP rank.
        Outside a Trainer (a step called by hand) every step reads back."""
        trainer = self._trainer
        if trainer is None:
            return True
        epoch_ends = isinstance(trainer.num_training_batches, int) and (
            batch_idx + 1 >= trainer.num_training_batches
        )
        fit_ends = 0 < trainer.max_steps <= trainer.global_step + len(trainer.optimizers)
        return epoch_ends or fit_ends or _logs_written_this_step(trainer)

    def training_labels(self, labels: Tensor, reads_back: bool) -> Tensor:
        """A source training batch's ``labels`` for the supervised loss, checked without a
        device sync on most steps: a value outside the task's range is noted on the device and
        made ignored (so the loss never indexes out of range: on a GPU a device-side assert
        that kills the process), and ``check_training_labels`` raises its error on the next
        step that reads back (``reads_back``), before any checkpoint and at the fit's end."""
        valid = self.task.valid_labels(labels)
        self._first_bad_label.add(labels, valid)
        if reads_back:
            self.check_training_labels()
        return torch.where(valid, labels, self.task.ignored_label)

    def check_training_labels(self) -> None:
        """Stop every rank with the error of the first bad training label since the last check
        (one read-back, only when a batch was noted; under DDP one all-gather)."""
        bad = self._first_bad_label.take()
        where = "source training batch"
        self.raise_together(None if bad is None else self.task.bad_label_error(bad, where))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """No checkpoint holds weights trained on a bad label: check the batches since the
        last step that read back."""
        self.check_training_labels()

    def on_train_end(self) -> None:
        self.check_training_labels()  # the batches after the last check

    def log_progress(self, values: Mapping[str, Tensor], reads_back: bool) -> None:
        """Log ``values`` (logger and progress bar) on the steps that read back
        (``reads_back``, as ``reads_back_this_step`` said before the step), as CPU numbers:
        Lightning converts every progress-bar value it holds with ``.item()`` after every
        batch, which on a GPU waits for the whole queue, so values on the device would cost a
        sync per step and CPU ones read at a log step cost none until the next."""
        if not values or not reads_back:
            return
        numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
        self.log_dict(
            {k: torch.tensor(n) for k, n in zip(values, numbers, strict=True)}, prog_bar=True
        )

    def reduce_only_active_gradients(self) -> None:
        """Under DDP, average at each backward only the gradients of the parameters that
        require gradients then (``ActiveGradientReduction``), instead of DDP's every bucket.
        A communication hook the strategy already registered wins (a warning says so)."""
        model = self.trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            return
        self.gradient_reduction = ActiveGradientReduction(model.process_group)
        try:
            model.register_comm_hook(self.gradient_reduction, reduce_active_gradients)
        except RuntimeError as err:
            self.gradient_reduction = None
            rank_zero_warn(
                f"{type(self).__name__}: DDP already has a communication hook ({err}); it reduces "
                "every network's gradients at every backward, not only the stepped one's"
            )

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


class ActiveGradientReduction:
    """State of ``reduce_active_gradients``: the process group, and the gradient bytes it has
    all-reduced so far (``bytes_reduced``, per process)."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.bytes_reduced = 0


def reduce_active_gradients(state: ActiveGradientReduction, bucket):  # DDP refuses str hints
    """A DDP communication hook (``GradBucket`` -> ``Future[Tensor]``): average across
    processes the gradients of the bucket's parameters that require gradients at this
    backward, leave the rest of the bucket alone.

    Lightning's ``toggle_optimizer`` switches ``requires_grad`` off for every parameter but the
    stepped optimiser's, so a GAM batch's discriminator backward reduces the discriminators'
    gradients alone and its F_t backward F_t's alone: each network once per batch, where
    DDP's default all-reduce sends every bucket at every backward (both networks twice, F_s
    too when the fit trained it). The parameters left out get no gradient in that backward
    on any rank (DDP leaves globally unused parameters' gradients untouched), so their part
    of the bucket is never read. The same parameters are switched off on every rank, so the
    collectives line up."""
    buffer = bucket.buffer()
    spans, offset = [], 0
    for parameter in bucket.parameters():
        end = offset + parameter.numel()
        if parameter.requires_grad:
            if spans and spans[-1][1] == offset:
                spans[-1][1] = end
            else:
                spans.append([offset, end])
        offset = end
    if offset != buffer.numel():  # a layout this hook does not know: reduce all of it
        spans = [[0, buffer.numel()]]
    futures = []
    world = dist.get_world_size(state.process_group)
    for start, end in spans:
        part = buffer[start:end].div_(world)
        state.bytes_reduced += part.numel() * part.element_size()
        futures.append(dist.all_reduce(part, group=state.process_group, async_op=True).get_future())
    if not futures:
        done = torch.futures.Future()
        done.set_result(buffer)
        return done
    return torch.futures.collect_all(futures).then(lambda _: buffer)


def _logs_written_this_step(trainer) -> bool:
    """Whether Lightning writes this batch's logged values to the loggers (every
    ``log_every_n_steps`` batches)."""
    # No public API tells whether this step's logs are written (checked on lightning 2.6.6).
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


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


class _FirstBadLabel:
    """The first out-of-range training label since the last ``take``, kept on the device: the
    steps in between never wait for it."""

    def __init__(self):
        self.found: Tensor | None = None
        self.value: Tensor | None = None

    def add(self, labels: Tensor, valid: Tensor) -> None:
        if not labels.numel():
            return
        invalid = ~valid.flatten()
        value = labels.flatten()[invalid.to(torch.uint8).argmax()].long()  # the first bad one
        if self.found is None:
            self.found, self.value = invalid.any(), value
        else:
            self.value = torch.where(self.found, self.value, value)
            self.found = self.found | invalid.any()

    def take(self) -> int | None:
        """The value found, or None; forgets it. Reads back only when a batch was added."""
        if self.found is None:
            return None
        found, value = torch.stack([self.found.long(), self.value]).tolist()
        self.found = self.value = None
        return value if found else None
