"""``python -m dam_lightning {fit,validate,test,predict} --config FILE``: the LightningCLI.

Adds what the stock CLI lacks for this library: ``num_classes``, the task (classification or
segmentation) and the class names flow from the data to the model; optimisers are module
arguments (GAM has two); every command gets a run folder named after the experiment and the time
(``runs/demo/2026-12-02_01-09-37``) that holds all it writes; a GAM run on several processes gets
the DDP flavour it needs (where the folder goes: ``runs.py``). The parser, its ``--help`` and a
config that does not parse: ``cli_parser.py``.

``main`` parses and runs the command, then hands its outcome to ``run_end.py``, which owns what
the command leaves behind and prints when it ends: a run that fails before it has produced
anything leaves no folder; a bad input (a ``dam_lightning.errors.DamError``) ends with one line,
``error: <message>`` (worded by ``cli_errors.py``; the traceback goes to the run's ``log.txt``, or
to the screen with ``--debug`` or ``DAM_LIGHTNING_DEBUG=1``); a fit stopped by Ctrl-C or SIGTERM
says how to resume it; the last lines on screen say where the run's files went.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import warnings

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from dam_lightning.callbacks.predictions import PredictionWriter
from dam_lightning.cli_parser import DamArgumentParser, RunConfigSaver, config_files, parser_kwargs
from dam_lightning.cpu_threads import choose_cpu_threads
from dam_lightning.data.datamodule import DomainAdaptationDataModule
from dam_lightning.errors import ConfigError
from dam_lightning.modules.base import EvaluatingModule
from dam_lightning.overview import SUBCOMMANDS, top_level_help, wants_top_level_help
from dam_lightning.preflight import random_instead_of_missing_weights, synthetic_data_config
from dam_lightning.run_end import (
    RunReport,
    end_failed,
    end_interrupted,
    end_stopped,
    end_succeeded,
    mark_unfinished,
    metrics_table,
    missing_folders,
    stopped_fit,
)
from dam_lightning.runs import (
    RUN_FOLDER_ENV,
    RunFolder,
    StopCleanly,
    atomic_write_text,
    checkpoint_network,
    claim_run_folder,
    launch_rank,
    logger_configs,
    point_logger_at,
    resumed_run_folder,
    run_directory,
    run_folder_place,
    timestamp,
)
from dam_lightning.trainer import DamTrainer
from dam_lightning.weights import checkpoint_origin, read_weights_file

DEBUG_ENV = "DAM_LIGHTNING_DEBUG"
"""Set to 1 (or pass ``--debug``) to see the full traceback of an error instead of one line."""

_SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry"}


class DamCLI(LightningCLI):
    """LightningCLI for dam_lightning modules and ``DomainAdaptationDataModule``.

    - Run folders: ``fit`` writes into ``<save_dir>/<experiment>/<date>_<time>``; ``validate``,
      ``test`` and ``predict`` into ``<command>-<date>_<time>`` inside the run folder of the
      checkpoint they evaluate (else beside the experiment's runs). ``<save_dir>`` and
      ``<experiment>`` are the logger's ``save_dir`` and ``name`` (else ``default_root_dir``
      and the config file's name); a W&B logger writes its files into the run folder.
    - ``predict`` always writes its predictions: a config without a ``PredictionWriter`` gets one
      (into ``<run folder>/predictions``); ``validate`` and ``test`` write ``metrics.json``.
    - A GAM run on several processes gets ``ddp_find_unused_parameters_true`` when the strategy is
      ``auto``; a plain DDP strategy chosen explicitly is refused at once.
    """

    def __init__(self, *args, report: RunReport | None = None, **kwargs):
        self.report = report if report is not None else RunReport()
        kwargs.setdefault("parser_class", DamArgumentParser)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's four commands, ``diagnose`` and ``preflight`` (``DamTrainer``'s)."""
        ours = {"diagnose": {"model", "datamodule"}, "preflight": {"model", "datamodule"}}
        return {**LightningCLI.subcommands(), **ours}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        """Lightning's subcommands, each command's own options titled ``options of <command>``,
        not with the first line of the trainer method's docstring (which stops mid-sentence:
        "Measure, for every candidate layer ..., the Gaussian gap and how"); the command's
        description is the whole sentence of ``SUBCOMMANDS``."""
        # Private hook and attributes: LightningCLI and argparse have no public way to retitle
        # the group of a command's options. # checked on lightning 2.6.6
        super()._add_subcommands(parser, **kwargs)
        for name, subparser in getattr(self, "_subcommand_parsers", {}).items():
            docstring = inspect.getdoc(getattr(self.trainer_class, name, None)) or ""
            for group in getattr(subparser, "_action_groups", []):
                title = group.title or ""
                if name in SUBCOMMANDS and title and docstring.startswith(title.rstrip(":")):
                    group.title = f"options of {name}"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # What the data is decides the task: a config names a dataset and a network only.
        for name in ("num_classes", "task", "class_names", "class_subsets"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path right after parsing, to re-apply its hyper-parameters:
        # a missing, damaged or unsafe file must be named here, before anything starts. The file
        # is read as weights only (``read_weights_file``); Lightning then reads it again the same
        # way (``_prepare_subcommand_kwargs`` passes ``weights_only=True``).
        # Private hook: LightningCLI has no public one between parsing and this read of the
        # checkpoint. # checked on lightning 2.6.6
        subcommand = self.config.get("subcommand")
        if subcommand == "diagnose":
            return  # its --ckpt_path names a source network, read by DamTrainer.diagnose
        if subcommand and self.config[subcommand].get("weights_only") is False:
            raise ConfigError(
                "--weights_only false would let Lightning run code stored in the checkpoint: "
                "dam_lightning reads checkpoints as weights only. Leave --weights_only out"
            )
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and str(path) not in _SPECIAL_CKPT_PATHS and "://" not in str(path):
            blob = read_weights_file(str(path), "--ckpt_path")
            self._refuse_another_network(blob, str(path))
            settings = blob.get("hyper_parameters") or {}
            self.report.ckpt_settings = (str(path), [k for k in settings if k[0] != "_"])
        super()._parse_ckpt_path()

    def _refuse_another_network(self, blob: dict, path: str) -> None:
        """A checkpoint of another network than the config's is named as such, before
        Lightning applies the checkpoint's settings to the config (its ``layers: {fc3: ...}``
        on an ERFNet would otherwise fail with a list of the 115 layers ERFNet has)."""
        config = self.config[self.config.subcommand]
        held, built = checkpoint_network(blob, path), _network_class(config)
        if not held or not built or held.rsplit(".", 1)[-1] == built.rsplit(".", 1)[-1]:
            return
        held, built = held.rsplit(".", 1)[-1], built.rsplit(".", 1)[-1]
        given = [str(c) for c in (config.get("config") or [])]
        configs = f" ({', '.join(given)})" if given else ""
        origin = checkpoint_origin(blob)
        fix = f" (its run's config: {origin}/config.yaml)" if origin else ""
        raise ConfigError(
            f"--ckpt_path: {path} holds {held} weights, but the config{configs} builds "
            f"{built}: pass a checkpoint written with this config, or use the config that "
            f"trained the checkpoint{fix}"
        )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """Lightning's keyword arguments of the command, with ``weights_only=True``: Lightning
        reads ``--ckpt_path`` as weights only whatever the environment says
        (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would otherwise switch its default off)."""
        # Private hook and attribute: LightningCLI has no public way to add a keyword argument
        # to the command's call. # checked on lightning 2.6.6
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            kwargs["weights_only"] = True
        return kwargs

    # ---- the run folder -------------------------------------------------------------------------

    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        config = self.config[subcommand]
        self._config_as_given = config.clone()  # what config.yaml records: no run folder in it
        if subcommand == "preflight" and config.get("synthetic"):
            synthetic_data_config(config.data, config.steps)
            for note in random_instead_of_missing_weights(config.model):
                print(f"preflight: {note}", flush=True)
        parent, name = run_folder_place(config, subcommand)
        inherited = os.environ.get(RUN_FOLDER_ENV) if launch_rank() > 0 else None
        if inherited:
            folder = inherited
        elif launch_rank() > 0:  # torchrun/SLURM: rank 0 broadcasts its folder at setup
            folder = os.path.join(parent, name)
        else:
            folder = resumed_run_folder(config, subcommand)
            self.report.resumed = folder is not None
            if folder is None:
                self.report.new_parents = missing_folders(parent)
                folder = claim_run_folder(parent, name)
            self.report.created_folder = True
            os.environ[RUN_FOLDER_ENV] = folder  # for the processes Lightning starts itself
        self.report.folder = folder
        self.report.data_keys = _data_keys(config)
        for logger in logger_configs(config):
            point_logger_at(logger, folder)
        if config.trainer.get("logger") in (None, True):  # Lightning's default logger
            config.trainer.default_root_dir = folder

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        self.report.trainer = trainer
        ckpt = self.config[self.subcommand].get("ckpt_path")
        ckpt = str(ckpt) if ckpt and os.path.isfile(str(ckpt)) else None
        network = _network_class(self.config[self.subcommand])
        if self.subcommand == "fit":
            run_folder = RunFolder(self.report.folder, resumed_from=ckpt, network=network)
        else:  # evaluation writes no checkpoint: point at the one it reads
            checkpoints = ckpt and os.path.dirname(ckpt)
            run_folder = RunFolder(self.report.folder, checkpoints=checkpoints, network=network)
        trainer.callbacks.insert(0, run_folder)
        if self.subcommand == "fit":
            trainer.callbacks.insert(1, StopCleanly())
        for callback in trainer.callbacks:
            if isinstance(callback, RunConfigSaver):
                callback.config = self._config_as_given
        for logger in trainer.loggers:
            _quiet_wandb_logger(logger)
        self._choose_ddp_flavour(trainer)
        if isinstance(trainer.accelerator, CPUAccelerator):
            line = choose_cpu_threads(trainer.num_devices)
            if line:
                rank_zero_info(line)
        return trainer

    def _choose_ddp_flavour(self, trainer: L.Trainer) -> None:
        """GAM's two backward passes per batch each reach only part of the parameters, which
        plain DDP refuses (after a minute, with a two-rank traceback)."""
        strategy = trainer.strategy
        several = trainer.num_devices * trainer.num_nodes > 1
        needs = getattr(self.model, "needs_unused_parameter_search", False)
        if not (several and needs and self.subcommand == "fit"):
            return
        if not isinstance(strategy, DDPStrategy):
            return  # FSDP, DeepSpeed...: the user's choice
        # DDPStrategy has no public getter or setter for the keyword arguments it passes to
        # DistributedDataParallel (find_unused_parameters), once built. # checked on lightning 2.6.6
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict) and ddp_kwargs.get("find_unused_parameters"):
            return
        given = self.config[self.subcommand].trainer.get("strategy")
        name = type(self.model).__name__
        if given in (None, "auto") and isinstance(ddp_kwargs, dict):
            ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info(
                f"Strategy: ddp_find_unused_parameters_true ({name} on "
                f"{trainer.num_devices * trainer.num_nodes} processes)"
            )
            return
        raise ConfigError(
            f"trainer.strategy={given!r} cannot train {name} on several processes: each of its "
            "two backward passes reaches only part of the parameters. Use --trainer.strategy "
            "ddp_find_unused_parameters_true (configs/ddp.yaml sets it)"
        )

    # ---- commands -------------------------------------------------------------------------------

    def before_fit(self) -> None:
        """``unfinished.txt`` in the run folder until the run ends well: a folder whose run was
        stopped or killed never looks complete, and says how to resume."""
        if self.trainer.is_global_zero:
            mark_unfinished(self.report, f"Running since {timestamp()}; if no process runs it "
                            "any more, it was stopped before it finished.")

    def before_predict(self) -> None:
        """Every prediction goes to a writer, and none is kept: Lightning's
        ``return_predictions`` (default: keep them all, 40 MiB per Cityscapes image) is
        ``False`` unless the command line asks for it; the CLI never uses what ``predict``
        returns."""
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())
        arguments = self.config_init[self.subcommand]  # what LightningCLI passes to predict
        if arguments.get("return_predictions") is None:
            arguments["return_predictions"] = False

    def before_validate(self) -> None:
        self._take_over_printing()

    def before_test(self) -> None:
        self._take_over_printing()

    def _take_over_printing(self) -> None:
        """Lightning's table of results prints scores as fractions (``val/target/miou
        0.8086``) where the summaries print percentages: the CLI prints its own table
        (``_print_metrics``), in percentages, unless ``--verbose false``."""
        arguments = self.config_init[self.subcommand]  # what LightningCLI passes to the command
        self._print_scores = arguments.get("verbose", True) is not False
        arguments["verbose"] = False

    def after_validate(self) -> None:
        self._write_metrics()

    def after_test(self) -> None:
        self._write_metrics()

    def _write_metrics(self) -> None:
        """``metrics.json``: every metric as logged (scores as fractions, as ``summary.json``
        holds them); on screen the same, scores in percentages."""
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in sorted(self.trainer.callback_metrics.items())}
        path = os.path.join(run_directory(self.trainer), "metrics.json")
        atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
        if getattr(self, "_print_scores", True):
            print(metrics_table(metrics, self.subcommand), flush=True)


def _data_keys(config) -> dict[str, list[str]]:
    """Each dataset class of a subcommand's config and the data keys that hold it
    (``{"GTA5": ["source"], "Cityscapes": ["target", "target_val"]}``), for errors that name
    the option to set."""
    keys: dict[str, list[str]] = {}
    data = config.get("data")
    for key, value in (vars(data) if data is not None else {}).items():
        class_path = value.get("class_path") if hasattr(value, "get") else None
        if class_path:
            keys.setdefault(str(class_path).rsplit(".", 1)[-1], []).append(key)
    return keys


def _network_class(config) -> str | None:
    """The class path of the network a subcommand's config builds (``model.init_args.net``)."""
    init = config.get("model", {}).get("init_args") if hasattr(config, "get") else None
    net = init.get("net") if hasattr(init, "get") else None
    net = net.get("class_path") if hasattr(net, "get") else net
    return str(net) if net else None


def _quiet_wandb_logger(logger) -> None:
    """Lightning's WandbLogger always passes ``anonymous``, which W&B deprecates with a warning
    on every run that the user cannot act on: drop the key when it says nothing."""
    # WandbLogger has no public view of the keyword arguments it will pass to wandb.init.
    # checked on lightning 2.6.6
    wandb_init = getattr(logger, "_wandb_init", None)
    if isinstance(wandb_init, dict) and wandb_init.get("anonymous") is None:
        wandb_init.pop("anonymous", None)


# ---- the command line ---------------------------------------------------------------------------


def main(args=None) -> None:
    """Entry point of ``python -m dam_lightning`` and the ``dam-lightning`` script: parse and run
    the command, then end it by its outcome (``run_end``: what is kept, printed, the exit code)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if wants_top_level_help(argv):
        print(top_level_help())
        raise SystemExit(0)
    _quiet_console()
    DamArgumentParser.debug = debug
    DamArgumentParser.config_files = config_files(argv)
    report = RunReport(argv=argv)
    inherited_env = os.environ.get(RUN_FOLDER_ENV)
    try:
        DamCLI(
            EvaluatingModule,
            DomainAdaptationDataModule,
            subclass_mode_model=True,
            auto_configure_optimizers=False,
            save_config_callback=RunConfigSaver,
            trainer_class=DamTrainer,
            parser_kwargs=parser_kwargs(),
            args=argv,
            report=report,
        )
    except BaseException as err:
        stop = stopped_fit(report)
        if stop is not None:  # a fit stopped by Ctrl-C or SIGTERM: exit 130 or 143
            end_stopped(report, stop, err)
        if isinstance(err, KeyboardInterrupt):  # before the trainer ran: nothing to keep, 130
            end_interrupted(report, err)
        end_failed(report, err, debug)  # one line and exit 1, or back here for the traceback
        raise
    else:
        end_succeeded(report)
    finally:
        if inherited_env is None:
            os.environ.pop(RUN_FOLDER_ENV, None)


class _DropNoise(logging.Filter):
    """Console filter for messages a user of this CLI cannot act on (they stay in log.txt)."""

    NOISE = ("💡 Tip:",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def _quiet_console() -> None:
    """Keep warnings and tips that a user of the CLI cannot act on off the screen."""
    # F_s is kept in eval mode on purpose; Lightning's generic warning about it would mislead.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"wandb(\..*)?")
    # the modules' metrics are torchmetrics objects, reduced across processes before logging
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed")
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
            isinstance(f, _DropNoise) for f in handler.filters
        ):
            handler.addFilter(_DropNoise())


__all__ = ["DamCLI", "main"]
