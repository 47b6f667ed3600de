"""Stage 2 of GAM as a callback: Gaussian i.i.d. matching of F_t at the start of adaptation epochs.

The algorithm is ``dam_lightning.matching``; this file only decides when it runs, which batches
it sees, and what gets logged. It works on a ``GAMAdaptModule`` through the seam that module
declares: ``adapting`` (F_s is final), ``source_net`` and ``target_net`` (read and corrected),
and ``on_gaussian_matched(report)`` (told after every correction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from dam_lightning.callbacks.progress import Phase, announce, logged_step
from dam_lightning.errors import ConfigError, WrongTypeError
from dam_lightning.matching import (
    ChannelStats,
    GaussianMatchingReport,
    foldable_layers,
    gaussian_match,
    measure_statistics,
)
from dam_lightning.matching.engine import reporting_matched_layers
from dam_lightning.modules.gam import GAMAdaptModule

log = logging.getLogger(__name__)


class GaussianMatching(L.Callback):
    """Correct F_t's per-channel statistics on target data to equal F_s's on source data.

    Runs before the first adaptation batch (right after stage 1, or at the start of a fit that
    loaded F_s) and then at the start of every ``every_n_epochs``-th epoch after that one
    (0 = only once). Statistics come from ``calibration_batches`` fixed batches per domain per
    process and are summed across DDP processes, so every rank applies identical corrections.
    The source statistics never change (F_s is final, the batches are fixed), so they are
    measured once per fit. When it has run is saved in checkpoints: a resumed run matches
    exactly when the uninterrupted one would have.

    Logged at each matching: ``gaussian/mean_gap_before``, ``gaussian/mean_gap_after``,
    ``gaussian/std_gap_before``, ``gaussian/std_gap_after`` (averages over the matched layers)
    and ``gaussian/matched_layers`` (their number); W&B also gets every layer's four gaps as one
    table, ``gaussian/per_layer``. On screen (rank 0, when the trainer shows bars) the source
    statistics and the matching each show a bar; their durations go to the log.

    Args:
        layers: layers to match (dotted names of Conv/Linear/BatchNorm modules); default all.
        calibration_batches: batches per domain (per process) used to measure statistics.
        every_n_epochs: re-match at the start of every n-th epoch; 0 matches only once.
        batchnorm: ``"fold"`` folds the correction into BatchNorm's affine weights (exact);
            ``"adabn"`` re-estimates BatchNorm running statistics on target data (AdaBN).
        mode: ``"one_pass"`` (one forward over the calibration data) or ``"layerwise"``
            (one forward per layer, for memory-bound networks).

    Example:
        >>> GaussianMatching(calibration_batches=5, every_n_epochs=0).every_n_epochs
        0
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        calibration_batches: int = 10,
        every_n_epochs: int = 1,
        batchnorm: Literal["fold", "adabn"] = "fold",
        mode: Literal["one_pass", "layerwise"] = "one_pass",
    ):
        if calibration_batches < 1:
            raise ConfigError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if every_n_epochs < 0:
            raise ConfigError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.layers = layers
        self.calibration_batches = calibration_batches
        self.every_n_epochs = every_n_epochs
        self.batchnorm = batchnorm
        self.mode = mode
        self.first_epoch: int | None = None  # the epoch of the first matching
        self.last_epoch: int | None = None  # the epoch of the latest matching
        self._source_stats: dict[str, ChannelStats] | None = None
        self._cpu_batches: dict[str, list[torch.Tensor]] = {}

    def _due(self, epoch: int, batch_idx: int) -> bool:
        if self.first_epoch is None:
            return True
        return (
            batch_idx == 0
            and self.every_n_epochs > 0
            and epoch != self.last_epoch
            and (epoch - self.first_epoch) % self.every_n_epochs == 0
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, GAMAdaptModule):
            raise WrongTypeError(
                "GaussianMatching corrects the target network of a GAMAdaptModule; "
                f"{type(pl_module).__name__} has none: remove the callback from this config"
            )
        if not hasattr(trainer.datamodule, "calibration_batches"):
            raise WrongTypeError("GaussianMatching needs a DomainAdaptationDataModule")
        self._source_stats = None
        self._cpu_batches = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.adapting and self._due(trainer.current_epoch, batch_idx):
            self.match(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"first_epoch": self.first_epoch, "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first_epoch = state_dict.get("first_epoch")
        self.last_epoch = state_dict.get("last_epoch")

    def match(self, trainer: L.Trainer, pl_module: L.LightningModule) -> GaussianMatchingReport:
        """Measure, correct and log once; returns the per-layer report."""
        layers = self._layer_names(pl_module)
        if self._source_stats is None:
            self._source_stats = self._measure_source(trainer, pl_module, layers)
        target_batches = self._batches(trainer, pl_module, "target")
        with (
            Phase(trainer, "Gaussian matching", len(layers), "layers") as phase,
            reporting_matched_layers(phase.advance),
        ):
            report = gaussian_match(
                pl_module.source_net,
                pl_module.target_net,
                source_batches=[],
                target_batches=target_batches,
                layers=layers,
                batchnorm=self.batchnorm,
                mode=self.mode,
                source_stats=self._source_stats,
            )
        pl_module.on_gaussian_matched(report)  # e.g. the drift anchor moves to F_t's weights
        log_report(trainer, report)
        message = (
            f"Gaussian matching at epoch {trainer.current_epoch}: {len(report.layers)} layers "
            f"in {phase.seconds:.1f} s, mean gap {_average(report, 'mean_gap_before'):.4f} -> "
            f"{_average(report, 'mean_gap_after'):.4f}"
        )
        if self.first_epoch is None:
            announce(message)  # the first one on screen, the later ones in the log only
            self.first_epoch = trainer.current_epoch
        elif rank_zero_only.rank == 0:
            log.info(message)
        self.last_epoch = trainer.current_epoch
        return report

    def _measure_source(self, trainer: L.Trainer, pl_module, layers: list[str]) -> dict:
        """F_s's statistics on the source calibration batches (one forward pass over them)."""
        batches = self._batches(trainer, pl_module, "source")
        with Phase(trainer, "Source statistics", len(batches), "batches") as phase:
            return measure_statistics(pl_module.source_net, phase.track(batches), layers)

    def _layer_names(self, pl_module) -> list[str]:
        return self.layers if self.layers is not None else foldable_layers(pl_module.target_net)

    def _batches(self, trainer: L.Trainer, pl_module, domain: str) -> OnDevice:
        """The domain's fixed calibration batches, decoded once per fit and kept on the CPU;
        each moves to the device only while it is used."""
        if domain not in self._cpu_batches:
            self._cpu_batches[domain] = trainer.datamodule.calibration_batches(
                domain, self.calibration_batches, trainer.global_rank, trainer.world_size
            )
        return OnDevice(self._cpu_batches[domain], pl_module.device)


class OnDevice(Sequence):
    """A sequence of CPU batches whose items are moved to ``device`` when read, so that only
    the batch in use (not the whole calibration set) lives on the accelerator.

    Example:
        >>> batches = OnDevice([torch.zeros(2), torch.ones(2)], torch.device("cpu"))
        >>> len(batches), batches[1].tolist()
        (2, [1.0, 1.0])
    """

    def __init__(self, batches: list[torch.Tensor], device: torch.device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index].to(self.device, non_blocking=True)


def _average(report: GaussianMatchingReport, gap: str) -> float:
    values = [getattr(layer, gap) for layer in report.layers.values()]
    return sum(values) / max(len(values), 1)


REPORT_COLUMNS = ("layer", "mean_gap_before", "mean_gap_after", "std_gap_before", "std_gap_after")
"""The columns of the per-layer table of one matching (W&B's ``gaussian/per_layer``)."""


def report_scalars(report: GaussianMatchingReport) -> dict[str, float]:
    """The few numbers of one matching that every logger gets: each gap averaged over the
    matched layers, and how many layers were matched.

    Example:
        >>> from types import SimpleNamespace as Match
        >>> report = GaussianMatchingReport({"a": Match(mean_gap_before=1.0, mean_gap_after=0.0,
        ...     std_gap_before=0.5, std_gap_after=0.0)})
        >>> scalars = report_scalars(report)
        >>> scalars["gaussian/mean_gap_before"], scalars["gaussian/matched_layers"]
        (1.0, 1)
    """
    scalars = {f"gaussian/{gap}": _average(report, gap) for gap in REPORT_COLUMNS[1:]}
    return {**scalars, "gaussian/matched_layers": len(report.layers)}


def report_rows(report: GaussianMatchingReport) -> list[list]:
    """One row per matched layer, in network order, in ``REPORT_COLUMNS``' order."""
    return [
        [name] + [getattr(match, gap) for gap in REPORT_COLUMNS[1:]]
        for name, match in report.layers.items()
    ]


def log_report(trainer: L.Trainer, report: GaussianMatchingReport) -> None:
    """Log one matching: ``report_scalars`` to every logger, and to W&B also the per-layer gaps
    as one table, ``gaussian/per_layer`` (four keys per layer would be 452 of ERFNet's)."""
    step = logged_step(trainer)
    scalars = report_scalars(report)
    for logger in trainer.loggers:
        metrics = dict(scalars)
        if isinstance(logger, WandbLogger):
            import wandb

            metrics["gaussian/per_layer"] = wandb.Table(
                columns=list(REPORT_COLUMNS), data=report_rows(report)
            )
        logger.log_metrics(metrics, step=step)
