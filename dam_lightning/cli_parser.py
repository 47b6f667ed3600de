"""The command line's parser and the config it yields: ``--help`` that offers this library's
classes, a config that does not parse reported in one line (worded by ``cli_errors.py``), and the
config saved as given into the run folder and the W&B run.
"""

from __future__ import annotations

import inspect
import os
import sys

from jsonargparse import ArgumentParser, DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import dam_lightning.data
import dam_lightning.models
from dam_lightning.cli_errors import short_parse_error
from dam_lightning.overview import DESCRIPTION, PROG, SUBCOMMANDS
from dam_lightning.runs import run_directory, unused_path

__all__ = [
    "DamArgumentParser", "LibraryChoicesHelpFormatter", "RunConfigSaver", "config_files",
    "parser_kwargs",
]  # fmt: skip


class LibraryChoicesHelpFormatter(DefaultHelpFormatter):
    """``--help`` that offers this library's datasets and networks, not every ``Dataset`` and
    ``nn.Module`` subclass that happens to be imported (torch's datapipes, torchvision's
    datasets, torch.nn's layers: over 700 lines). Only the help changes: any class still works
    when a config names it by its full ``class_path``.
    """

    _NARROWED = {"torch.utils.data.Dataset": "Dataset", "torch.nn.Module": "torch.nn.Module"}
    _MARKER = ", known subclasses: "

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        if self._MARKER not in text or not text.endswith(")"):
            return text
        head, listed = text[:-1].split(self._MARKER, 1)
        paths = listed.split(", ")
        base = self._NARROWED.get(paths[0])
        if base is None:
            return text
        ours = [p for p in paths if p in _offered_classes(networks=action.dest.endswith("net"))]
        return (
            f"{head}, this library's: {', '.join(ours) or 'none'}; or any other {base} class "
            "by its full class_path)"
        )


def _offered_classes(networks: bool) -> set[str]:
    """The class paths ``--help`` offers: the networks of ``dam_lightning.models`` (for a
    ``net``), or those and the datasets and transforms of ``dam_lightning.data``."""
    packages = [dam_lightning.models] + ([] if networks else [dam_lightning.data])
    return {f"{p.__name__}.{name}" for p in packages for name in p.__all__}


class DamArgumentParser(LightningArgumentParser):
    """The CLI's parser: a config that does not validate ends in one line that names the key and
    what is wrong, not in the 50-line usage and jsonargparse's nested "Does not validate against
    any of the Union subtypes" report (both still shown with ``--debug``)."""

    debug = False
    config_files: tuple[str, ...] = ()  # the --config files given, to name the one with a bad key

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", LibraryChoicesHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if self.debug or not self.exit_on_error:
            return super().error(message, ex)
        self.logger.error(message)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"(`{prog} --help` lists the options; --debug shows the details)\n")
        line = short_parse_error(message, ex, self._dotted_keys(), self.config_files)
        sys.stderr.write(f"error: {line}\n")
        raise SystemExit(2)

    def _dotted_keys(self) -> list[str]:
        """The keys this parser and its subcommands' parsers accept (``trainer.max_steps``...),
        for "did you mean"."""
        keys = []
        for action in self._actions:
            keys.append(action.dest)
            for parser in getattr(action, "_name_parser_map", {}).values():
                keys += [a.dest for a in parser._actions]
        return keys


def config_files(argv: list[str]) -> tuple[str, ...]:
    """The files given with ``--config FILE`` or ``--config=FILE``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return tuple(files)


def parser_kwargs() -> dict:
    """The parser's name, what the tool is and, per command, what the command does (whole
    sentences: Lightning's default is the first line of the trainer method's docstring)."""
    kwargs: dict = {"description": DESCRIPTION}
    kwargs.update({name: {"description": text} for name, text in SUBCOMMANDS.items()})
    if os.path.basename(sys.argv[0]) == "__main__.py":  # python -m dam_lightning
        kwargs["prog"] = PROG
    return kwargs


class RunConfigSaver(SaveConfigCallback):
    """Save the config as given as ``<run folder>/config.yaml`` and into the W&B run's config.

    Every run has its own folder, so a second run never collides with the first; a name that is
    taken all the same (a resumed run reusing a folder) becomes ``config-1.yaml``.
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
                logger.experiment.config.update(
                    {"cli": as_dict, "run_folder": run_directory(trainer)}, allow_val_change=True
                )


# Keep ``null`` entries in saved configs, so a saved config round-trips. jsonargparse 4.49 renamed
# the keyword (skip_none -> skip_unset) and warns on the old one.
_KEEP_NONE = (
    {"skip_unset": False}
    if "skip_unset" in inspect.signature(ArgumentParser.dump).parameters
    else {"skip_none": False}
)
