"""Stage 1 of GAM: supervised training of the source network F_s on labelled source data.

Its checkpoint feeds ``GAMAdaptModule(source_weights=...)``; with ``init_weights`` it
fine-tunes a trained network instead, e.g. on a few labelled target images. (A GAM run that is
asked to train F_s itself, the one-command demos, does so as the first phase of its own fit.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from dam_lightning.errors import MissingFileError
from dam_lightning.modules.base import EvaluatingModule, NetworkFactory
from dam_lightning.modules.task import TaskName
from dam_lightning.weights import load_network_weights


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
        skip_mismatched_classifier: with ``init_weights``, load everything but a classifier
            whose class count differs (e.g. the authors' 20-class ERFNet file into 19 classes),
            saying what was skipped; otherwise such a file is an error.

    Example:
        >>> from dam_lightning.models import LeNet
        >>> module = SourceModule(LeNet, num_classes=10)
        >>> module(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

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
        skip_mismatched_classifier: bool = False,
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

    @property
    def fine_tunes(self) -> bool:
        """Whether this fit starts from ``init_weights`` (a fine-tune): ``AdaptationSummary``
        then scores the starting network before the first step."""
        return bool(self.hparams.init_weights)

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
            origin = load_initial_weights(
                self.net, path, self.hparams.skip_mismatched_classifier
            )
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
        reads_back = self.reads_back_this_step(batch_idx)
        y = self.training_labels(y, reads_back)
        if self.augment is not None:
            x = self.augment(x)
        loss = self.task.loss(self.net(x), y)
        self.log_progress({"train/loss": loss}, reads_back)
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


def load_initial_weights(
    net: nn.Module, path: str, skip_mismatched_classifier: bool = False
) -> str:
    """Load ``net``'s weights from ``path`` (SourceModule or GAM checkpoint, or state dict) for
    ``init_weights``; returns where the file came from. A missing file gets advice of its own
    (no stage-1 config publishes fine-tuning weights)."""
    if not os.path.isfile(path):
        raise MissingFileError(
            f"init_weights: {path} does not exist; pass the checkpoint of a finished run, e.g. "
            "runs/<experiment>/<date>_<time>/checkpoints/last.ckpt or "
            "runs/<name>_source/source.ckpt"
        )
    return load_network_weights(
        net, path, setting="init_weights", skip_mismatched_classifier=skip_mismatched_classifier
    )
