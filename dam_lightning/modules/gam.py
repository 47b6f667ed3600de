"""Stage 3 of GAM: general activation matching, orchestrated as a LightningModule.

A frozen source network F_s, a trainable target network F_t initialised from it, and one
discriminator per matched layer. Each batch: a discriminator step, then a target-network step
(manual optimisation). The algorithm's pieces live in ``dam_lightning.matching``; Gaussian
matching (stage 2) runs from the ``GaussianMatching`` callback.

With ``source_steps`` the same fit first trains F_s (stage 1) on Lightning's own loop: the
first ``source_steps`` batches are supervised steps of F_s, then F_t becomes a copy of it and
adaptation begins. One fit, one progress bar, one set of checkpoints: a run killed in any stage
resumes where it was.

The seam between the stages (what the callbacks use, nothing else):
``source_net``, ``target_net``, ``adapting`` (F_s is final and F_t adapts),
``on_gaussian_matched(report)`` (called by ``GaussianMatching`` after it corrected F_t) and
``gaussian_report`` / ``matched_at_step`` (the latest matching, read by ``AdaptationSummary``
and ``StageOverlays``).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dam_lightning.errors import ConfigError, TrainingStopped
from dam_lightning.matching import (
    ChannelStats,
    ChannelStatsAccumulator,
    GaussianMatchingReport,
    mean_gap,
    std_gap,
)
from dam_lightning.matching.adversarial import GANKind, GANLoss, discriminator_for
from dam_lightning.matching.drift import DriftReduction, weight_drift
from dam_lightning.matching.taps import ActivationTaps, resolve_layer
from dam_lightning.modules.base import EvaluatingModule, NetworkFactory, _inputs_and_labels
from dam_lightning.modules.source import paper_source_optimizer
from dam_lightning.modules.task import TaskName
from dam_lightning.weights import load_network_weights


def paper_adversarial_optimizer(params) -> torch.optim.Optimizer:
    """The digits code's adaptation optimiser, for discriminators and F_t: Adam(2e-4, beta1 0.5)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


class GAMAdaptModule(EvaluatingModule):
    """Adapt a source network to an unlabelled target domain by deep activation matching.

    Minimises over the target weights theta_t:

        drift_weight * ||theta_s - theta_t||^2 + adversarial_weight * sum_i w_i * GAN_i(F_t)

    where each discriminator D_i tells F_s's layer-i activations on source images from F_t's on
    target images. The paper's ablations are configuration: ``layers={"fc4": 1}`` with
    ``drift_weight=0`` is ADDA; ``layers={}`` with the ``GaussianMatching`` callback is the
    "Gaussian matching only" row.

    Args:
        net: builds a network from ``num_classes`` (e.g. ``LeNet``); F_s and F_t are two copies.
        num_classes: number of classes; linked from the data module by the CLI.
        layers: ``{layer name: weight w_i}`` of the matched layers (dotted module paths).
        adversarial_weight: lambda, the weight of the adversarial sum.
        gan_loss: ``"vanilla"`` (digits) or ``"lsgan"`` (segmentation).
        drift_weight: weight of the weight-drift term; 0 disables it.
        drift_reduction: ``"mean_per_tensor"`` (official code) or ``"sum"`` (paper, Eq. 3).
        drift_anchor: what the drift pulls F_t towards. ``"source"``: theta_s, F_s's weights
            (the paper's Eq. 3). ``"matched"``: F_t's weights right after the latest Gaussian
            matching (theta_s until the first one), so the drift term does not pull F_t back
            out of the statistics Gaussian matching has just corrected.
        source_weights: a ``SourceModule`` checkpoint (``.ckpt``) or a state dict of ``net``.
        source_steps: when ``source_weights`` is not given, the fit's first ``source_steps``
            batches train F_s on the labelled source data (stage 1, one optimiser step per
            batch), then adaptation begins (so one command runs the whole pipeline). The
            trainer's budget (``max_epochs`` / ``max_steps``) covers both phases: with
            ``max_steps``, stage 1 takes ``source_steps`` of it and every adaptation batch 2.
        source_optimizer: optimiser for that source training; default Adam(1e-3, wd 2.5e-5).
        discriminator_optimizer / target_optimizer: default Adam(2e-4, betas=(0.5, 0.999)).
        discriminator_scheduler / target_scheduler: optional, stepped once per batch.
        example_input_shape: one input's shape (C, H, W), to size the discriminators; default
            ``net.example_input_shape``.
        discriminator_width: base width of the patch discriminators of feature-map layers
            (64 -> 128 -> 256 channels at the default); the MLP discriminators of vector
            layers keep the paper's 500-500. A GAM step's cost over a source step grows with it
            (docs/results/segmentation_speed.md).
        discriminator_depth: hidden convolutions of those patch discriminators (3: width, 2x,
            4x channels; 4 adds 8x width, the depth of AdaptSegNet's output discriminator).
        freeze_target_batchnorm: keep F_t's BatchNorm layers in eval mode while adapting:
            their running statistics stay those of F_s after Gaussian matching (which folds its
            correction against them), their gamma/beta still train. Otherwise the 1-4 images
            per GPU of a segmentation batch would replace them with noisy running averages, and
            under DDP each process would keep its own (only gradients are synchronised).
        task, class_names, class_subsets: what the data is (linked from the data module by the
            CLI): ``"classification"`` or ``"segmentation"``, see ``EvaluatingModule``.
        class_weights: segmentation only: per-class weights of the cross-entropy of the source
            training that ``source_steps`` runs.

    Attributes:
        gaussian_report: the latest ``GaussianMatchingReport`` (None before the first).
        matched_at_step: ``trainer.global_step`` at the latest Gaussian matching.

    Example:
        >>> from dam_lightning.models import LeNet
        >>> gam = GAMAdaptModule(LeNet, num_classes=10, layers={"fc3": 0.1, "fc4": 1.0})
        >>> sorted(gam.discriminators.keys())
        ['fc3', 'fc4']
    """

    train_domains = ("source", "target")
    needs_unused_parameter_search = True  # the D step and the G step each reach part of it

    def __init__(
        self,
        net: NetworkFactory,
        num_classes: int = 10,
        layers: dict[str, float] | None = None,
        adversarial_weight: float = 1.0,
        gan_loss: GANKind = "vanilla",
        drift_weight: float = 1.0,
        drift_reduction: DriftReduction = "mean_per_tensor",
        drift_anchor: Literal["source", "matched"] = "source",
        source_weights: str | None = None,
        source_steps: int = 0,
        source_optimizer: OptimizerCallable | None = None,
        discriminator_optimizer: OptimizerCallable | None = None,
        target_optimizer: OptimizerCallable | None = None,
        discriminator_scheduler: LRSchedulerCallable | None = None,
        target_scheduler: LRSchedulerCallable | None = None,
        example_input_shape: tuple[int, ...] | None = None,
        discriminator_width: int = 64,
        discriminator_depth: int = 3,
        freeze_target_batchnorm: bool = True,
        task: TaskName = "classification",
        class_names: Sequence[str] | None = None,
        class_subsets: Mapping[str, Sequence[str]] | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, task, class_names, class_subsets, class_weights)
        self.save_hyperparameters(
            ignore=[
                "net",
                "source_optimizer",
                "discriminator_optimizer",
                "target_optimizer",
                "discriminator_scheduler",
                "target_scheduler",
            ]
        )
        self.automatic_optimization = False
        self.layers = dict({"fc3": 0.1, "fc4": 1.0} if layers is None else layers)
        _check_settings(
            self.layers, adversarial_weight, drift_weight, source_steps, discriminator_depth
        )
        self.source_net = net(num_classes)
        self.target_net = net(num_classes)
        # F_s trains in stage 1 only when this fit builds it; its gradients must be known to
        # DDP when it wraps the module (before any hook), so they are switched on here.
        self.source_net.requires_grad_(self.trains_source_network).eval()
        self.target_net.load_state_dict(self.source_net.state_dict())
        for name in self.layers:  # a typo in a config gets its own message, naming the key
            try:
                resolve_layer(self.source_net, name)
            except ValueError as err:
                raise ConfigError(f"layers: {err}") from None
        if drift_anchor not in ("source", "matched"):
            raise ConfigError(f"drift_anchor must be 'source' or 'matched', got {drift_anchor!r}")
        # The weights the drift term pulls F_t towards: F_s itself, or a frozen copy of F_t
        # taken after each Gaussian matching (saved in checkpoints, so a resume keeps it).
        self.drift_anchor_net = (
            copy.deepcopy(self.source_net).requires_grad_(False)
            if drift_anchor == "matched"
            else None
        )
        self.gan = GANLoss(gan_loss)
        self.discriminators = nn.ModuleDict(
            {
                _key(n): discriminator_for(s, discriminator_width, discriminator_depth)
                for n, s in self._tap_shapes(example_input_shape).items()
            }
        )
        self.source_taps = ActivationTaps(self.source_net, self.layers)
        self.target_taps = ActivationTaps(self.target_net, self.layers)
        self.optimizer_factories = {
            "source": source_optimizer or paper_source_optimizer,
            "discriminator": discriminator_optimizer or paper_adversarial_optimizer,
            "target": target_optimizer or paper_adversarial_optimizer,
        }
        self.scheduler_factories = {
            "discriminator": discriminator_scheduler,
            "target": target_scheduler,
        }
        # Saved with the weights: a resumed run continues stage 1 where it stopped, and never
        # retrains or reloads a finished F_s.
        self.register_buffer("source_ready", torch.tensor(False))
        self.register_buffer("source_batches_done", torch.tensor(0))
        self._source_batches = 0
        self._adapting: bool | None = None  # source_ready read once, not at every batch
        self.register_load_state_dict_post_hook(_forget_adapting)
        self._unchecked_losses = _UncheckedLosses()
        self.gaussian_report: GaussianMatchingReport | None = None
        self.matched_at_step: int | None = None

    def _tap_shapes(self, example_input_shape) -> dict[str, torch.Size]:
        """Shapes of the matched layers' activations, from one dry forward of F_s."""
        if not self.layers:
            return {}
        shape = example_input_shape or getattr(self.source_net, "example_input_shape", None)
        if shape is None:
            raise ConfigError(
                f"{type(self.source_net).__name__} has no example_input_shape: pass "
                "example_input_shape=(C, H, W) so the discriminators can be sized"
            )
        with torch.no_grad():
            acts = ActivationTaps(self.source_net, self.layers)(torch.zeros(2, *shape))
        return {name: a.shape for name, a in acts.items()}

    @property
    def eval_net(self) -> nn.Module:
        """F_t; F_s while stage 1 trains it (a validation then scores the source network)."""
        return self.target_net if self.adapting else self.source_net

    def train(self, mode: bool = True):
        """Switch train/eval mode; once adapting, F_s stays in eval mode whatever the trainer
        asks, and so do F_t's BatchNorm layers with ``freeze_target_batchnorm``."""
        super().train(mode)
        self.source_net.train(mode and not self.adapting)
        if self.drift_anchor_net is not None:
            self.drift_anchor_net.eval()
        if self.hparams.freeze_target_batchnorm:
            for module in self.target_net.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # ---- stage 1: make F_s available, then F_t = F_s --------------------------------------------

    @property
    def trains_source_network(self) -> bool:
        """Whether this fit trains F_s itself (``source_steps`` without ``source_weights``)."""
        return self.hparams.source_steps > 0 and not self.hparams.source_weights

    @property
    def uses_source_labels(self) -> bool:
        """Whether this fit reads source labels: only to train F_s (stage 1). The data module
        then serves source images alone; a fit that trains F_s decodes them to its end."""
        return self.trains_source_network and not self.adapting

    @property
    def adapting(self) -> bool:
        """Whether F_s is final and F_t is being adapted (stages 2 and 3)."""
        if self._adapting is None:  # reading the buffer syncs with the device: once per load
            self._adapting = bool(self.source_ready)
        return self._adapting

    def on_fit_start(self) -> None:
        if self.trainer.precision in ("bf16-true", "16-true"):
            raise ConfigError(
                f"trainer.precision={self.trainer.precision!r} keeps the weights themselves in "
                "16 bits: the small updates of adaptation (Adam at lr 1e-4 or 2e-4, next to the "
                "weight drift's pull) fall below their resolution and F_t barely moves. Use "
                "precision: bf16-mixed (fp32 weights, bf16 compute) or 16-mixed"
            )
        if self.adapting:  # resumed from a checkpoint that holds the final F_s and F_t
            self.source_net.requires_grad_(False)
        elif self.hparams.source_weights:
            origin = load_network_weights(self.source_net, self.hparams.source_weights)
            rank_zero_info(f"Source network F_s: {self.hparams.source_weights} ({origin})")
            self._begin_adaptation()
        elif self.hparams.source_steps > 0:
            done = self._source_batches = int(self.source_batches_done)  # a resume's count
            rank_zero_info(
                f"Stage 1: training the source network F_s for {self.hparams.source_steps} "
                f"batches (source_steps){f', from batch {done}' if done else ''}, then adapting"
            )
        else:
            raise ConfigError(
                "GAMAdaptModule needs a source network: pass source_weights=<SourceModule .ckpt or "
                "state dict> or source_steps=N to train F_s on the source data first"
            )
        self.train()  # Lightning never calls train() itself: apply F_s's and F_t's modes
        self.reduce_only_active_gradients()

    def on_train_end(self) -> None:
        super().on_train_end()  # the labels of the stage-1 batches after the last check
        self._stop_if_a_loss_was_not_finite()  # the batches after the last check
        if not self.adapting:
            rank_zero_warn(
                f"the fit ended in stage 1, after {int(self.source_batches_done)} of "
                f"{self.hparams.source_steps} source batches: F_t was never adapted. The "
                "trainer's max_epochs/max_steps covers stage 1 and adaptation: raise it"
            )

    def _source_step(self, batch, reads_back: bool) -> None:
        """One supervised step of F_s (stage 1); the last one hands over to adaptation."""
        optimizer = self._optimizer("source")
        x, y = batch
        y = self.training_labels(y, reads_back)
        self.toggle_optimizer(optimizer)
        loss = self.task.loss(self.source_net(x), y)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        self.log_progress({"train/source_loss": loss}, reads_back)
        self._source_batches += 1  # counted in Python: no device sync per step
        self.source_batches_done.fill_(self._source_batches)
        if self._source_batches >= self.hparams.source_steps:
            world = self.trainer.world_size
            rank_zero_info(
                f"Source network trained for {self.hparams.source_steps} batches"
                f"{f' on {world} processes' if world > 1 else ''}: last loss "
                f"{float(loss.detach()):.4f}. Adapting from here"
            )
            self._begin_adaptation()

    def _begin_adaptation(self) -> None:
        """Freeze F_s for good and start F_t (and the drift anchor) as a copy of it. Under DDP
        every rank takes rank 0's F_s: the weights agree already (one file, or DDP's averaged
        gradients), but BatchNorm running statistics of stage 1 are each rank's own."""
        self.source_net.requires_grad_(False)
        if self.trainer.world_size > 1:
            state = self.trainer.strategy.broadcast(self.source_net.state_dict(), src=0)
            self.source_net.load_state_dict(state)
        self.target_net.load_state_dict(self.source_net.state_dict())
        self._anchor_drift_at_target_net()
        self.source_ready.fill_(True)
        self._adapting = True
        self.train(self.training)

    def on_gaussian_matched(self, report: GaussianMatchingReport) -> None:
        """Called by ``GaussianMatching`` after it has corrected F_t: records the report (for
        the summary and the overlays) and, with ``drift_anchor="matched"``, makes F_t's new
        weights the drift term's reference."""
        self.gaussian_report = report
        self.matched_at_step = self.trainer.global_step
        self._anchor_drift_at_target_net()

    def _anchor_drift_at_target_net(self) -> None:
        if self.drift_anchor_net is not None:
            self.drift_anchor_net.load_state_dict(self.target_net.state_dict())

    @property
    def drift_reference(self) -> nn.Module:
        """The network whose weights the drift term measures F_t's distance from."""
        return self.source_net if self.drift_anchor_net is None else self.drift_anchor_net

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint written before ``source_batches_done`` existed holds a final F_s."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        if "source_batches_done" not in state:
            state["source_batches_done"] = torch.tensor(self.hparams.source_steps)

    # ---- stage 3: one discriminator step, one target step per batch ------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        reads_back = self.reads_back_this_step(batch_idx)  # decided before any optimiser step
        if not self.adapting:
            self._source_step(batch["source"], reads_back)
            return
        if not self.discriminators and self.hparams.drift_weight == 0:
            self._check_something_adapts()
            return  # "Gaussian matching only": the callback does all the work
        x_s = _inputs_and_labels(batch["source"])[0]  # no source label is used from here
        x_t = batch["target"]
        at = (self.current_epoch, batch_idx, self.trainer.global_step)
        with torch.no_grad():
            source_acts = self.source_taps(x_s)
        target_acts = self.target_taps(x_t)
        losses, accuracies = {}, {}
        if self.discriminators:
            losses, accuracies = self._discriminator_step(
                self._optimizer("discriminator"), source_acts, target_acts
            )
        losses |= self._target_step(self._optimizer("target"), source_acts, target_acts)
        self._step_schedulers()
        self._unchecked_losses.add(at, losses)
        if reads_back:
            self._stop_if_a_loss_was_not_finite()
            self.log_progress(accuracies, reads_back)
            self._log_activation_gaps(source_acts, target_acts)

    def _check_something_adapts(self) -> None:
        if self.gaussian_report is None:  # GaussianMatching matches before the first batch
            raise ConfigError(
                "nothing would adapt: layers is empty, drift_weight is 0 and no GaussianMatching "
                "callback is configured. Name layers to match (e.g. {'fc3': 0.1, 'fc4': 1.0}) "
                "or add the GaussianMatching callback"
            )

    def _discriminator_step(
        self, optimizer, source_acts: dict, target_acts: dict
    ) -> tuple[dict, dict]:
        """One step of the discriminators; returns their losses and accuracies (on the
        device: nothing here waits for it)."""
        self.toggle_optimizer(optimizer)
        total, losses, accuracies = 0.0, {}, {}
        for name, weight in self.layers.items():
            d = self.discriminators[_key(name)]
            real, fake = d(source_acts[name]), d(target_acts[name].detach())
            loss = self.gan.discriminator_loss(real, fake)
            total = total + weight * loss
            losses[layer_key(name, "loss_d")] = loss.detach()
            self.log(layer_key(name, "loss_d"), loss)
            accuracies[layer_key(name, "acc_d")] = self.gan.accuracy(real, fake)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(total)
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        return losses, accuracies

    def _target_step(self, optimizer, source_acts: dict, target_acts: dict) -> dict:
        """One step of F_t; returns its losses (on the device)."""
        self.toggle_optimizer(optimizer)
        adversarial = torch.zeros((), device=self.device)
        losses = {}
        for name, weight in self.layers.items():
            loss = self.gan.generator_loss(self.discriminators[_key(name)](target_acts[name]))
            adversarial = adversarial + weight * loss
            losses[layer_key(name, "loss_g")] = loss.detach()
            self.log(layer_key(name, "loss_g"), loss)
        drift = weight_drift(self.target_net, self.drift_reference, self.hparams.drift_reduction)
        total = self.hparams.adversarial_weight * adversarial + self.hparams.drift_weight * drift
        losses["train/drift"] = drift.detach()
        self.log("train/drift", drift)
        self.log("train/loss_g", total)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(total)
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        return losses

    def _stop_if_a_loss_was_not_finite(self) -> None:
        """Stop every rank with ``TrainingStopped`` (a FloatingPointError) naming the first loss
        that was NaN or inf since the last check, on the rank where it came first: its layer,
        epoch, batch and step. Reading the losses back syncs with the device, so training steps
        only record them, and this runs where a sync costs nothing extra: every
        ``log_every_n_steps`` batches, at an epoch's last batch, before every checkpoint and at
        the end of the fit (on every rank at the same point; under DDP one all-gather).

        Up to ``log_every_n_steps - 1`` batches may train on after a NaN/inf loss (their
        weights likely NaN too); none of them reaches a checkpoint, since the check before
        saving stops the run first: the newest checkpoint on disk holds only weights from
        before the bad batch."""
        bad = self._unchecked_losses.first_not_finite()
        error, when = None, (0, 0)
        if bad is not None:
            (epoch, batch_idx, step), index, key, value = bad
            error, when = self._non_finite_error(key, value, epoch, batch_idx, step), (step, index)
        self.raise_together(error, when)

    def _non_finite_error(self, key: str, value: float, epoch, batch_idx, step) -> TrainingStopped:
        what = "the weight drift"
        if key.startswith("layer/"):
            layer, loss = key.removeprefix("layer/").rsplit("/", 1)
            what = {
                "loss_d": f"the discriminator loss of layer {layer}",
                "loss_g": f"the adversarial loss of F_t at layer {layer}",
            }[loss]
        return TrainingStopped(
            f"{what} ({key}) is {value} at epoch {epoch}, batch {batch_idx} (global step {step}); "
            f"training stopped at global step {self.trainer.global_step}, the first check after "
            f"it, and no checkpoint holds weights updated with it. "
            f"{_last_checkpoint_text(self.trainer)} Lower the learning rates or "
            "adversarial_weight, or check the data for NaN/inf"
        )

    @torch.no_grad()
    def _log_activation_gaps(self, source_acts: dict, target_acts: dict) -> None:
        """Log the Gaussian gap of every matched layer on this batch: F_t's activations on the
        target images against F_s's on the source images (the ones the discriminators just
        saw), as ``layer/<name>/mean_gap`` and ``layer/<name>/std_gap``. It shows over time
        what the discriminators are asked to close, beside their accuracy; per process, not
        summed across DDP ranks (a curve to watch, not a measurement)."""
        for name in self.layers:
            source, target = _batch_stats(source_acts[name]), _batch_stats(target_acts[name])
            self.log(layer_key(name, "mean_gap"), mean_gap(target, source))
            self.log(layer_key(name, "std_gap"), std_gap(target, source))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to write a checkpoint after a NaN/inf loss or whose weights hold NaN or inf:
        the last good one stays the newest on disk."""
        super().on_save_checkpoint(checkpoint)  # nor one trained on a bad label
        self._stop_if_a_loss_was_not_finite()
        named = [(n, p) for n, p in self.named_parameters() if p.is_floating_point()]
        if not named:
            return
        finite = torch.stack([p.detach().isfinite().all() for _, p in named])
        if bool(finite.all()):
            return
        bad = [n for (n, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        raise TrainingStopped(
            f"weights {', '.join(bad[:3])} hold NaN or inf at epoch {self.current_epoch} (global "
            f"step {self.trainer.global_step}): no checkpoint written. "
            f"{_last_checkpoint_text(self.trainer)} Lower the learning rates or "
            "adversarial_weight"
        )

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    @property
    def optimizer_roles(self) -> list[str]:
        """The optimisers this module steps, in ``configure_optimizers`` order."""
        return (
            (["source"] if self.trains_source_network else [])
            + (["discriminator"] if self.discriminators else [])
            + ["target"]
        )

    def _optimizer(self, role: str):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[self.optimizer_roles.index(role)]

    def configure_optimizers(self):
        params = {
            "source": self.source_net.parameters(),
            "discriminator": self.discriminators.parameters(),
            "target": self.target_net.parameters(),
        }
        optimizers, schedulers = [], []
        for role in self.optimizer_roles:
            optimizer = self.optimizer_factories[role](params[role])
            optimizers.append(optimizer)
            if self.scheduler_factories.get(role) is not None:
                schedulers.append(self.scheduler_factories[role](optimizer))
        return optimizers, schedulers


class _UncheckedLosses:
    """The losses of the adaptation batches since the last check, kept on the device with
    where they were computed (epoch, batch, global step): one read-back checks them all."""

    def __init__(self):
        self.batches: list[tuple[tuple[int, int, int], list[str], torch.Tensor]] = []

    def add(self, at: tuple[int, int, int], losses: dict) -> None:
        if losses:
            values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
            self.batches.append((at, list(losses), values))

    def first_not_finite(self) -> tuple[tuple[int, int, int], int, str, float] | None:
        """``(at, index in the batch, key, value)`` of the first NaN/inf loss, or None; forgets
        the batches it checked."""
        batches, self.batches = self.batches, []
        if not batches:
            return None
        values = torch.cat([v for *_, v in batches]).tolist()  # the one read-back
        position = 0
        for at, keys, _ in batches:
            for index, key in enumerate(keys):
                if not math.isfinite(values[position]):
                    return at, index, key, values[position]
                position += 1
        return None


def _forget_adapting(module: GAMAdaptModule, incompatible_keys) -> None:
    """After ``load_state_dict``: ``source_ready`` may have changed, read it again when asked."""
    module._adapting = None


def layer_key(layer: str, metric: str) -> str:
    """The logged name of a per-layer metric, ``layer/<layer>/<metric>``: the discriminator's
    loss and accuracy, F_t's adversarial loss and the activation gap of one matched layer share
    one prefix, so they are read together (W&B: all in section ``layer``, one layer's panels
    next to each other; one section per layer when the workspace groups by all prefixes).

    Example:
        >>> layer_key("encoder.layers.2", "acc_d")
        'layer/encoder.layers.2/acc_d'
    """
    return f"layer/{layer}/{metric}"


def _batch_stats(activation: torch.Tensor) -> ChannelStats:
    """Per-channel statistics of one batch's activation on this process alone (no DDP sum: a
    logged curve must not cost a collective per layer and batch)."""
    accumulator = ChannelStatsAccumulator()
    accumulator.update(activation)
    return accumulator.compute(reduce=lambda moments: moments)


def _key(layer: str) -> str:
    """ModuleDict key for a dotted layer name (module names cannot contain dots)."""
    return layer.replace(".", "__")


def _check_settings(
    layers: dict, adversarial_weight, drift_weight, source_steps, discriminator_depth=3
) -> None:
    """Refuse weights that are negative, NaN or inf, and negative step counts, at construction."""
    for name, value in [("adversarial_weight", adversarial_weight), ("drift_weight", drift_weight),
                        *((f"layers[{k!r}]", v) for k, v in layers.items())]:  # fmt: skip
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    if source_steps < 0:
        raise ConfigError(f"source_steps must be >= 0, got {source_steps}")
    if discriminator_depth < 1:
        raise ConfigError(f"discriminator_depth must be >= 1, got {discriminator_depth}")


def _last_checkpoint_text(trainer) -> str:
    checkpoint = getattr(trainer, "checkpoint_callback", None)
    path = checkpoint and (checkpoint.last_model_path or checkpoint.best_model_path)
    if path and os.path.isfile(path):
        return f"The last checkpoint written before it is {path}."
    return "No checkpoint had been written yet."
