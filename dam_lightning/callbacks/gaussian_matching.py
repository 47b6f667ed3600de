"""Stage 2 of GAM as a callback: Gaussian i.i.d. matching of F_t at the start of adaptation epochs.

The algorithm is ``dam_lightning.matching.gaussian``; this file only decides when it runs, which
batches it sees, and what gets logged. It works with any module that has ``source_net`` and
``target_net`` (``GAMAdaptModule``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from dam_lightning.matching.gaussian import (
    ChannelStats,
    GaussianMatchingReport,
    foldable_layers,
    gaussian_match,
    measure_statistics,
)

log = logging.getLogger(__name__)


class GaussianMatching(L.Callback):
    """Correct F_t's per-channel statistics on target data to equal F_s's on source data.

    Runs before the first adaptation epoch and then every ``every_n_epochs`` epochs
    (0 = only before the first). Statistics come from ``calibration_batches`` fixed batches per
    domain per process and are summed across DDP processes, so every rank applies identical
    corrections. The source statistics never change (F_s is frozen, the batches are fixed), so
    they are measured once per fit.

    Logged (per matched layer): ``gaussian/mean_gap_before/<layer>``, ``.../mean_gap_after/..``,
    ``gaussian/std_gap_before/<layer>``, ``gaussian/std_gap_after/<layer>``.

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
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.layers = layers
        self.calibration_batches = calibration_batches
        self.every_n_epochs = every_n_epochs
        self.batchnorm = batchnorm
        self.mode = mode
        self.last_report: GaussianMatchingReport | None = None
        self._source_stats: dict[str, ChannelStats] | None = None
        self._cpu_batches: dict[str, list[torch.Tensor]] = {}

    def _due(self, epoch: int) -> bool:
        return epoch == 0 or (self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for attribute in ("source_net", "target_net"):
            if not hasattr(pl_module, attribute):
                raise TypeError(
                    f"GaussianMatching needs a module with source_net and target_net "
                    f"(GAMAdaptModule); {type(pl_module).__name__} has no {attribute}"
                )
        if not hasattr(trainer.datamodule, "calibration_loader"):
            raise TypeError("GaussianMatching needs a DomainAdaptationDataModule")
        self._source_stats = None
        self._cpu_batches = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer.current_epoch):
            self.match(trainer, pl_module)

    def match(self, trainer: L.Trainer, pl_module: L.LightningModule) -> GaussianMatchingReport:
        """Measure, correct and log once; returns the per-layer report."""
        target_batches = self._batches(trainer, pl_module, "target")
        if self._source_stats is None:
            source_batches = self._batches(trainer, pl_module, "source")
            self._source_stats = measure_statistics(
                pl_module.source_net, source_batches, self._layer_names(pl_module)
            )
        report = gaussian_match(
            pl_module.source_net,
            pl_module.target_net,
            source_batches=[],
            target_batches=target_batches,
            layers=self._layer_names(pl_module),
            batchnorm=self.batchnorm,
            mode=self.mode,
            source_stats=self._source_stats,
        )
        notify = getattr(pl_module, "on_gaussian_matched", None)
        if callable(notify):
            notify()  # e.g. GAMAdaptModule moves its drift anchor to the matched weights
        metrics = {f"gaussian/{k}": v for k, v in report.summary().items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        message = (
            f"Gaussian matching at epoch {trainer.current_epoch}: {len(report.layers)} layers, "
            f"mean gap {_average(report, 'mean_gap_before'):.4f} -> "
            f"{_average(report, 'mean_gap_after'):.4f}"
        )
        if self.last_report is None:
            rank_zero_info(message)  # the first one on screen, the later ones in the log only
        elif rank_zero_only.rank == 0:
            log.info(message)
        self.last_report = report
        return report

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
