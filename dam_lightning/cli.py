"""``python -m dam_lightning {fit,validate,test,predict} --config FILE``: the LightningCLI.

Adds what the stock CLI lacks for this library: ``num_classes``, the task (classification or
segmentation) and the class names flow from the data to the model,
optimisers are module arguments (GAM has two), and the run config is saved into the run's own
folder (and W&B) instead of failing on the second run that shares a save_dir.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from dam_lightning.callbacks.predictions import PredictionWriter
from dam_lightning.data.datamodule import DomainAdaptationDataModule
from dam_lightning.modules.base import EvaluatingModule
from dam_lightning.runs import run_directory, unused_path


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``<run dir>/config.yaml`` and into the W&B run's config.

    Every run has its own folder (``save_dir/name/version``, beside its checkpoints), so a second
    run never collides with the first; a resumed run that reuses a folder writes
    ``config-1.yaml`` rather than overwrite the original.
    """

    def __init__(self, parser, config, config_filename: str = "config.yaml", **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, config_filename, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = unused_path(os.path.join(run_directory(trainer), self.config_filename))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.parser.save(self.config, path, skip_validation=True, overwrite=True, **_KEEP_NONE)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                as_dict = self.parser.dump(self.config, format="json", **_KEEP_NONE)
                logger.experiment.config.update({"cli": as_dict}, allow_val_change=True)


# Keep ``null`` entries in saved configs, so a saved config round-trips. jsonargparse 4.49 renamed
# the keyword (skip_none -> skip_unset) and warns on the old one.
_KEEP_NONE = (
    {"skip_unset": False}
    if "skip_unset" in inspect.signature(ArgumentParser.dump).parameters
    else {"skip_none": False}
)


class DamCLI(LightningCLI):
    """LightningCLI for dam_lightning modules and ``DomainAdaptationDataModule``.

    ``predict`` always writes its predictions: a config without a ``PredictionWriter`` gets one
    (into ``<run dir>/predictions``), so the command never ends with nothing to show.
    """

    def before_predict(self) -> None:
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # What the data is decides the task: a config names a dataset and a network only.
        for name in ("num_classes", "task", "class_names", "class_subsets"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def main(args=None) -> None:
    """Entry point of ``python -m dam_lightning`` and the ``dam-lightning`` script."""
    # F_s is kept in eval mode on purpose; Lightning's generic warning about it would mislead.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    DamCLI(
        EvaluatingModule,
        DomainAdaptationDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_callback=RunConfigSaver,
        args=args,
    )
    _finish_wandb_run()


def _finish_wandb_run() -> None:
    """Close the W&B run at the end of the command, so that a second command started from the
    same Python process (a notebook, a test) gets a run and a run folder of its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
