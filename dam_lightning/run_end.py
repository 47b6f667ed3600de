"""What a command leaves behind and prints when it ends (``cli.main`` calls one ``end_*`` per
outcome): on success where the run's files went (and the results table of ``validate``/``test``);
on an error one line and its folder kept with the traceback in ``log.txt``, or removed if it holds
no result; on Ctrl-C or SIGTERM where the fit stopped and the command that resumes it; exit codes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dam_lightning.callbacks.predictions import PredictionWriter
from dam_lightning.callbacks.publish import PublishCheckpoint
from dam_lightning.cli_errors import point_at_fix, user_message
from dam_lightning.overview import PROG
from dam_lightning.runs import (
    LOG_FILE,
    UNFINISHED_FILE,
    RunFolder,
    StopCleanly,
    atomic_write_text,
    launch_rank,
)


@dataclass
class RunReport:
    """What a CLI command did, for ``main`` to report and to clean up after a failure."""

    folder: str | None = None
    created_folder: bool = False  # this process made the folder (rank 0)
    new_parents: list[str] = field(default_factory=list)  # the folders made to hold it
    data_keys: dict[str, list[str]] = field(default_factory=dict)  # "GTA5": ["source"]
    resumed: bool = False  # fit --ckpt_path <run>/checkpoints/x.ckpt continues in <run>
    argv: list[str] = field(default_factory=list)  # the command line, for the resume command
    ckpt_settings: tuple[str, list[str]] | None = None  # (--ckpt_path, the settings it gave)
    trainer: L.Trainer | None = None


# ---- how a command ends: one function per outcome, called by ``cli.main`` ----------------------


def stopped_fit(report: RunReport) -> StopCleanly | None:
    """The ``StopCleanly`` of a fit that Ctrl-C or SIGTERM stopped; None when no signal stopped
    the command."""
    stop = _stop_callback(report)
    return stop if stop is not None and stop.reason else None


def end_stopped(report: RunReport, stop: StopCleanly, err: BaseException) -> NoReturn:
    """A fit stopped by Ctrl-C or SIGTERM: close the run, say where it stopped, what was saved and
    the command that resumes it; exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    _close_run(report, failed=err)
    _report_stop(report, stop)
    raise SystemExit(130 if stop.reason.startswith("Ctrl-C") else 143) from None


def end_interrupted(report: RunReport, err: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C before the trainer ran: nothing to keep; exit 130."""
    _close_run(report, failed=err)
    print("\nStopped by Ctrl-C before the run started: nothing was saved.",
          file=sys.stderr, flush=True)  # fmt: skip
    raise SystemExit(130) from None


def end_failed(report: RunReport, err: BaseException, debug: bool) -> None:
    """A command that raised ``err``: close the run (a folder without results is removed; one
    with results keeps the traceback in its log, and its ``unfinished.txt`` says how it failed)
    and end with one line, ``error: <message>``, exit 1. Returns instead, for ``main`` to
    re-raise ``err`` with its traceback, with ``debug`` or when ``err`` is not one of
    dam_lightning's errors (``cli_errors.user_message``)."""
    error = None if debug else user_message(err)
    error = error and point_at_fix(error, report.data_keys)
    error = error and _blame_checkpoint(error, report.ckpt_settings)
    log = _close_run(report, failed=err)
    if log and os.path.isfile(os.path.join(report.folder, UNFINISHED_FILE)):
        status = f"Failed: {error or type(err).__name__} (the traceback is in {LOG_FILE})"
        mark_unfinished(report, status, _newest_checkpoint(report.folder))
    if error is None:
        return
    if log:
        print(f"(traceback in {log}; --debug shows it here)", file=sys.stderr)
    if report.trainer is not None:  # end a progress bar's unfinished line
        print(flush=True)
    rank = launch_rank()
    prefix = f"[rank {rank}] " if rank else ""
    print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def end_succeeded(report: RunReport) -> None:
    """A command that ended well: close the run; the process that made the run folder removes
    its ``unfinished.txt`` and prints where the files went."""
    _close_run(report, failed=None)
    if report.created_folder:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(report.folder, UNFINISHED_FILE))
        print(_where_files_went(report), flush=True)


# ---- what validate and test print when they end -----------------------------------------------


def is_score(key: str) -> bool:
    """Whether a logged metric is a score in [0, 1] (an accuracy or an IoU), which the CLI
    prints as a percentage; a loss or a count is printed as it is.

    Example:
        >>> [is_score(k) for k in ("val/target/miou", "val/target/iou/road", "val/source/loss")]
        [True, True, False]
    """
    name = key.rsplit("/", 1)[-1]
    return "/iou/" in key or re.search(r"(acc|iou)", name) is not None


def metrics_table(metrics: dict[str, float], command: str) -> str:
    """The results of ``validate``/``test`` as the CLI prints them: one metric per line,
    scores in percentages with two decimals (as the summaries print them), others as they are.

    Example:
        >>> print(metrics_table({"val/target/acc": 0.80862, "val/target/loss": 0.5}, "validate"))
        validate results (scores in %; metrics.json holds them as fractions):
          val/target/acc   80.86
          val/target/loss  0.5000
    """
    width = max((len(k) for k in metrics), default=0)
    lines = [f"{command} results (scores in %; metrics.json holds them as fractions):"]
    for key, value in metrics.items():
        shown = f"{100 * value:.2f}" if is_score(key) else f"{value:.4f}"
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


# ---- closing the run, the resume command, where the files went ---------------------------------


def _close_run(report: RunReport, failed: BaseException | None) -> str | None:
    """Finish the W&B run and, after a failure, clean up: a run folder that holds no result is
    removed (W&B's offline run inside it too), one that does keeps the traceback in its log.
    Returns the log that holds the traceback, if any."""
    folder = report.folder
    if isinstance(failed, SystemExit) and failed.code in (0, None):
        failed = failed if isinstance(failed, SIGTERMException) else None
    ours = failed is not None and report.created_folder and folder and os.path.isdir(folder)
    remove = ours and not report.resumed and not _holds_results(folder)
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        # W&B's goodbye would point at an offline run about to be deleted: keep it quiet then
        quiet = open(os.devnull, "w") if remove else None  # noqa: SIM115
        with (
            contextlib.redirect_stdout(quiet or sys.stdout),
            contextlib.redirect_stderr(quiet or sys.stderr),
        ):
            wandb.finish(exit_code=0 if failed is None else 1)
        if quiet is not None:
            quiet.close()
    run_folder = _run_folder_callback(report)
    if run_folder is not None:
        run_folder.stop_log()
    if not ours:
        return None
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
        for parent in report.new_parents:  # deepest first; left alone once something is in it
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        return None
    log = os.path.join(folder, LOG_FILE)
    with open(log, "a", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(failed)))
    return log


def _blame_checkpoint(message: str, ckpt_settings: tuple[str, list[str]] | None) -> str:
    """``message`` about a setting that ``--ckpt_path``'s checkpoint gave (Lightning applies a
    checkpoint's settings to the config), saying so: the user never wrote it.

    Example:
        >>> print(_blame_checkpoint("layers: no layer 'fc3'", ("x.ckpt", ["layers"]))[:64])
        layers: no layer 'fc3' (layers came from --ckpt_path x.ckpt, not
    """
    if ckpt_settings is None:
        return message
    path, settings = ckpt_settings
    key = message.split(":", 1)[0]
    if ":" not in message or key not in settings:
        return message
    return (
        f"{message} ({key} came from --ckpt_path {path}, not from the config: was that "
        "checkpoint written with this config?)"
    )


def _stop_callback(report: RunReport) -> StopCleanly | None:
    callbacks = report.trainer.callbacks if report.trainer is not None else []
    return next((cb for cb in callbacks if isinstance(cb, StopCleanly)), None)


def _report_stop(report: RunReport, stop: StopCleanly) -> None:
    """After a fit stopped by Ctrl-C or SIGTERM: on screen and in ``unfinished.txt``, where it
    stopped, what was saved and the command that resumes it."""
    folder = report.folder
    how = {"SIGTERM": "SIGTERM", "Ctrl-C": "Ctrl-C", "Ctrl-C twice": "a second Ctrl-C"}
    lines = [f"\nStopped by {how.get(stop.reason, stop.reason)} at global step {stop.step}: "
             "the run has not finished."]  # fmt: skip
    checkpoint = stop.saved or _newest_checkpoint(folder)
    if not folder or not os.path.isdir(folder):
        lines.append("Nothing was saved (no checkpoint yet): run the same command again.")
    elif checkpoint is None:
        lines.append(f"Run folder: {folder} (no checkpoint yet: run the same command again)")
    else:
        saved = "saved where it stopped" if stop.saved else "the newest; nothing saved now"
        resume = _resume_command(report.argv, checkpoint)
        lines += [f"Run folder: {folder} (its {UNFINISHED_FILE} says it has not finished)",
                  f"  checkpoint:  {checkpoint} ({saved})",
                  f"Resume with: {resume}"]  # fmt: skip
        if report.created_folder:
            mark_unfinished(report, " ".join(lines[0].split()), checkpoint)
    text = "\n".join(lines)
    if folder and os.path.isfile(os.path.join(folder, LOG_FILE)):
        with open(os.path.join(folder, LOG_FILE), "a", encoding="utf-8") as log:
            log.write(text.lstrip("\n") + "\n")  # the log ends with what to do, not a traceback
    print(text, file=sys.stderr, flush=True)


def mark_unfinished(report: RunReport, status: str, checkpoint: str | None = None) -> None:
    """Write ``unfinished.txt``: ``status`` and the command that resumes the run."""
    folder = report.folder
    checkpoint = checkpoint or os.path.join(folder, "checkpoints", "last.ckpt")
    text = f"{status}\nResume with: {_resume_command(report.argv, checkpoint)}\n"
    atomic_write_text(os.path.join(folder, UNFINISHED_FILE), text)


def _resume_command(argv: list[str], checkpoint: str) -> str:
    """The command line that resumes this run from ``checkpoint``: the same arguments, any
    ``--ckpt_path`` replaced."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return f"{PROG} {shlex.join([*kept, '--ckpt_path', checkpoint])}"


def _newest_checkpoint(folder: str | None) -> str | None:
    """The run's ``last.ckpt``, else its newest checkpoint; None if it has none."""
    found = sorted(Path(folder or ".", "checkpoints").glob("*.ckpt"), key=os.path.getmtime)
    if not folder or not found:
        return None
    return str(next((p for p in found if p.name == "last.ckpt"), found[-1]))


def missing_folders(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _run_folder_callback(report: RunReport) -> RunFolder | None:
    callbacks = report.trainer.callbacks if report.trainer is not None else []
    return next((cb for cb in callbacks if isinstance(cb, RunFolder)), None)


def _holds_results(folder: str) -> bool:
    """Whether a failed run produced something worth keeping (a checkpoint, a summary,
    predictions, metrics): its config, log and W&B files alone are not."""
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry in ("checkpoints", "predictions") and os.path.isdir(path) and os.listdir(path):
            return True
        if entry.startswith(("summary", "metrics", "diagnose")):
            return True
    return False


def _where_files_went(report: RunReport) -> str:
    """The last lines of a successful command: its run folder and what is in it."""
    folder = report.folder
    callbacks = report.trainer.callbacks if report.trainer is not None else []
    lines = [f"Run folder: {folder}"]
    checkpoints = sorted(Path(folder, "checkpoints").glob("*.ckpt"), key=os.path.getmtime)
    if checkpoints:
        shown = next((p for p in checkpoints if p.name == "last.ckpt"), checkpoints[-1])
        more = f" (and {len(checkpoints) - 1} more there)" if len(checkpoints) > 1 else ""
        lines.append(f"  checkpoint:  {shown}{more}")
    for name, label in (
        ("summary.md", "summary"),
        ("metrics.json", "metrics"),
        ("diagnose.md", "diagnosis"),
    ):
        if os.path.isfile(os.path.join(folder, name)):
            lines.append(f"  {label + ':':12} {os.path.join(folder, name)}")
    for callback in callbacks:
        if isinstance(callback, PredictionWriter) and callback.folder:
            lines.append(f"  predictions: {callback.folder}")
    offline = sorted(Path(folder, "wandb").glob("offline-run-*"))
    if offline:
        lines.append(f"  W&B upload:  wandb sync {offline[-1]}")
    lines.append("  also:        config.yaml (the config as given), log.txt (the full log)")
    for callback in callbacks:
        if isinstance(callback, PublishCheckpoint) and callback.published:
            lines.append(f"Network for the next stage: {callback.published}")
    return "\n".join(lines)


__all__ = [
    "RunReport",
    "end_failed",
    "end_interrupted",
    "end_stopped",
    "end_succeeded",
    "is_score",
    "mark_unfinished",
    "metrics_table",
    "missing_folders",
    "stopped_fit",
]
