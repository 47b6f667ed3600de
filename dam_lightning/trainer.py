"""The Trainer the CLI builds: Lightning's, plus ``diagnose``, the layer-by-layer look at the
domain gap that a user runs before adapting (``python -m dam_lightning diagnose``), and
``preflight``, the cost of a run measured before it starts (``python -m dam_lightning preflight``).

A method of the Trainer because that is what a LightningCLI subcommand is: the config's data and
network, the run folder and the loggers all come with it. The analysis itself is
``dam_lightning.diagnosis`` (and ``dam_lightning.preflight``); this file only finds the source
network and writes the results.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from dam_lightning.diagnosis import Diagnosis, diagnose_datamodule
from dam_lightning.errors import ConfigError, WrongTypeError
from dam_lightning.preflight import PreflightReport, run_preflight
from dam_lightning.runs import run_directory
from dam_lightning.weights import load_network_weights


class DamTrainer(L.Trainer):
    """``lightning.Trainer`` with two more commands, ``diagnose`` and ``preflight``.

    Example:
        >>> trainer = DamTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        >>> callable(trainer.diagnose), callable(trainer.preflight)
        (True, True)
    """

    def diagnose(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
        calibration_batches: int = 10,
        layers: list[str] | None = None,
    ) -> Diagnosis:
        """Measure, for every candidate layer of the source network, the Gaussian gap and how
        well a small classifier tells source from target activations, before and after
        Gaussian matching; write ``diagnose.md``, ``diagnose.json``, ``gap_by_layer.png`` and
        ``histograms.png`` into the run folder, print the table. The gaps do not choose the
        layers GAM matches (``dam_lightning.diagnosis.result.PURPOSE``).

        Args:
            model: a ``SourceModule`` or ``GAMAdaptModule`` config; its (source) network is
                analysed.
            datamodule: source and target data; calibration batches come from its training sets.
            ckpt_path: the source network's checkpoint: a ``SourceModule`` checkpoint, a
                ``GAMAdaptModule`` checkpoint (its F_s, say of a run that trained F_s itself
                with ``source_steps``, as the segmentation demo does) or a state dict; default
                the model's ``source_weights``. Read as weights only: a file that holds other
                Python objects is refused, and nothing in it runs.
            calibration_batches: batches per domain.
            layers: layers to analyse (dotted names); default every Conv/Linear/BatchNorm.
        """
        net = getattr(model, "source_net", None) or getattr(model, "net", None)
        if net is None:
            raise WrongTypeError(f"diagnose needs a SourceModule or GAMAdaptModule, not {model!r}")
        weights = ckpt_path or getattr(model, "hparams", {}).get("source_weights")
        if not weights:
            raise ConfigError(
                "diagnose needs a trained source network: pass --ckpt_path SOURCE.ckpt (a "
                "SourceModule checkpoint, e.g. runs/<name>_source/source.ckpt) or set "
                "model.init_args.source_weights"
            )
        load_network_weights(net, weights, prefixes=("net.", "source_net."),
                             setting="ckpt_path" if ckpt_path else "source_weights")  # fmt: skip
        net.to(self.strategy.root_device).eval()
        diagnosis = diagnose_datamodule(
            net,
            datamodule,
            calibration_batches=calibration_batches,
            layers=layers,
            progress=self.progress_bar_callback is not None,
        )
        self._report_diagnosis(diagnosis)
        return diagnosis

    @rank_zero_only
    def _report_diagnosis(self, diagnosis: Diagnosis) -> None:
        diagnosis.save(run_directory(self))
        print(diagnosis.report(), flush=True)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                figures = diagnosis.figures()
                logger.experiment.log(
                    {f"diagnose/{name}": wandb.Image(fig) for name, fig in figures.items()}
                )

    def preflight(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        steps: int = 5,
        synthetic: bool = False,
    ) -> PreflightReport:
        """Run a few steps of every stage of the config (source training if the module trains
        F_s, Gaussian matching, GAM, validation) on this machine's first device and print, per
        stage, seconds per step, peak device memory, loader against step throughput (which one
        is the bottleneck) and the estimated wall time of the whole configured run; write the
        same as ``preflight.json`` into the run folder. Nothing trained here is kept.

        Args:
            model: the config's module (``SourceModule`` or ``GAMAdaptModule``). A missing
                ``source_weights`` file is replaced by random weights (the cost is the same).
            datamodule: the config's data.
            steps: timed steps per stage, after 2 untimed warm-up steps.
            synthetic: measure on random stand-ins of the configured sizes instead of the
                datasets read from files (``--synthetic true`` when the data is not there yet;
                the loader is then not measured).
        """
        if steps < 1:
            raise ConfigError(f"preflight --steps must be >= 1, got {steps}")
        report = run_preflight(self, model, datamodule, steps, synthetic)
        self._report_preflight(report)
        return report

    @rank_zero_only
    def _report_preflight(self, report: PreflightReport) -> None:
        folder = run_directory(self)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "preflight.json"), "w", encoding="utf-8") as f:
            f.write(report.to_json() + "\n")
        print(report.table(), flush=True)
