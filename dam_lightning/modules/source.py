"""Stage 1 of GAM: supervised training of the source network F_s on labelled source data.

``SourceModule`` is the Lightning way (its checkpoint feeds ``GAMAdaptModule(source_weights=...)``;
with ``init_weights`` it fine-tunes a trained network instead, e.g. on a few labelled target
images); ``train_source_network`` is the same objective as a plain loop, which
``GAMAdaptModule`` uses when it is asked to train F_s itself (the one-command demo).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from dam_lightning.modules.base import EvaluatingModule, NetworkFactory
from dam_lightning.modules.task import Task, TaskName


def paper_source_optimizer(params) -> torch.optim.Optimizer:
    """The digits code's source optimiser: Adam, lr 1e-3, L2 weight decay 2.5e-5."""
    return torch.optim.Adam(params, lr=1e-3, weight_decay=2.5e-5)


class SourceModule(EvaluatingModule):
    """Train a network on the labelled source domain (the paper's "no adaptation" baseline).

    Validation reports the accuracy on the target domain (``val/target/acc``: what the source
    network achieves without adaptation) and, when the data module has a source validation set,
    on the source domain (``val/source/acc``).

    Args:
        net: builds the network from ``num_classes`` (e.g. ``LeNet``).
        num_classes: number of classes; linked from the data module by the CLI.
        optimizer: optimiser factory; default Adam(lr=1e-3, weight_decay=2.5e-5) (paper, digits).
        scheduler: optional LR scheduler factory, stepped once per batch.
        augment: optional module applied to every source batch before the forward pass, in
            training only (e.g. ``dam_lightning.data.RandomAffine()``; not in the paper).
        task, class_names, class_subsets: what the data is (linked from the data module by the
            CLI): ``"classification"`` or ``"segmentation"``, see ``EvaluatingModule``.
        class_weights: segmentation only: per-class weights of the cross-entropy.
        init_weights: start from these weights instead of a random initialisation (fine-tuning,
            e.g. ``configs/few_shot.yaml``): a ``SourceModule`` checkpoint (its ``net``), a
            ``GAMAdaptModule`` checkpoint (its adapted ``target_net``) or a state dict of
            ``net``. Loaded once, when the first fit starts; a resumed fit, or a fit of a module
            restored from a checkpoint, keeps the weights it has (the ``weights_initialised``
            buffer, saved in checkpoints, records that).

    Example:
        >>> from dam_lightning.models import LeNet
        >>> module = SourceModule(LeNet, num_classes=10)
        >>> module(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    train_domains = ("source",)
    """The data module reads this to serve only the source loader during training."""

    def __init__(
        self,
        net: NetworkFactory,
        num_classes: int = 10,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        augment: nn.Module | None = None,
        task: TaskName = "classification",
        class_names: Sequence[str] | None = None,
        class_subsets: Mapping[str, Sequence[str]] | None = None,
        class_weights: Sequence[float] | None = None,
        init_weights: str | None = None,
    ):
        super().__init__(num_classes, task, class_names, class_subsets, class_weights)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "augment"])
        self.net = net(num_classes)
        self.augment = augment
        self.optimizer_factory = optimizer or paper_source_optimizer
        self.scheduler_factory = scheduler
        # Saved with the weights: a resumed fit must continue from them, not reload init_weights.
        self.register_buffer("weights_initialised", torch.tensor(False))

    @property
    def eval_net(self) -> nn.Module:
        return self.net

    def on_fit_start(self) -> None:
        """Load ``init_weights`` into ``net`` at the start of the first fit only (Lightning
        restores a resumed fit's checkpoint before this hook, buffer included)."""
        super().on_fit_start()
        self._initialise_weights(fitting=True)

    def on_validation_start(self) -> None:
        """``validate`` without ``--ckpt_path`` scores the ``init_weights`` network, not a
        random one (a fit or a checkpoint has already set the weights: then nothing is done)."""
        self._initialise_weights()

    def on_test_start(self) -> None:
        self._initialise_weights()

    def on_predict_start(self) -> None:
        self._initialise_weights()

    def _initialise_weights(self, fitting: bool = False) -> None:
        """Load ``init_weights`` once, unless the weights already came from a checkpoint."""
        if bool(self.weights_initialised):
            return
        path = self.hparams.init_weights
        if path:
            origin = load_initial_weights(self.net, path)
            rank_zero_info(f"Initial weights of the network: {path} ({origin})")
        elif fitting and getattr(self.trainer.datamodule, "few_shot", None):
            rank_zero_warn(
                f"training on {self.trainer.datamodule.few_shot} labelled target images from a "
                "random initialisation: no model.init_args.init_weights was given. To fine-tune, "
                "pass the checkpoint of a source or GAM run as init_weights"
            )
        self.weights_initialised.fill_(True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint written before ``weights_initialised`` existed holds trained weights:
        mark them initialised, so it loads (strictly) and is never overwritten by init_weights."""
        super().on_load_checkpoint(checkpoint)
        checkpoint.get("state_dict", {}).setdefault("weights_initialised", torch.tensor(True))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x, y = batch["source"]
        self.task.check_labels(y, "source training batch")
        if self.augment is not None:
            x = self.augment(x)
        loss = self.task.loss(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def load_initial_weights(net: nn.Module, path: str) -> str:
    """Load ``net``'s weights from ``path`` (SourceModule or GAM checkpoint, or state dict) for
    ``init_weights``; returns where the file came from. The loading is GAM's
    ``load_network_weights``; a missing file gets advice of its own (no stage-1 config
    publishes fine-tuning weights)."""
    from dam_lightning.modules.gam import load_network_weights  # gam.py imports this file

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"init_weights: {path} does not exist; pass the checkpoint of a finished run, e.g. "
            "runs/<experiment>/<date>_<time>/checkpoints/last.ckpt or "
            "runs/<name>_source/source.ckpt"
        )
    return load_network_weights(net, path, setting="init_weights")


def train_source_network(
    net: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int,
    task: Task,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
    average_gradients: bool = False,
) -> list[float]:
    """Supervised training of ``net`` for ``steps`` batches, cycling through ``batches``.

    The same objective as ``SourceModule.training_step``, as a plain loop so that a GAM run can
    build its own source network. ``on_step(step, loss)`` is called after every step (a
    progress bar). With ``average_gradients`` (under DDP, each process with its own share of the
    data) the gradients are averaged across processes before every update, so all processes
    keep identical weights. Returns the loss of every step.
    """
    net.train()
    losses = []
    for step, (x, y) in enumerate(itertools.islice(_cycle(batches), steps)):
        x, y = x.to(device), y.to(device)
        task.check_labels(y, "source training batch")
        loss = task.loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if average_gradients:
            _average_gradients(net)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def _average_gradients(net: nn.Module) -> None:
    """Replace every gradient by its mean over the DDP processes (one all-reduce per step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _cycle(batches: Iterable):
    """Iterate over ``batches`` again and again (a DataLoader reshuffles on every pass)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the source training data is empty: no batch to train on")
