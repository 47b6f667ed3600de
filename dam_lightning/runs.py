"""Where a run's files go, and how they are written without ever leaving a half-written file.

One command of the CLI is one *run folder*, ``<save_dir>/<experiment>/<date>_<time>``, which holds
everything the run writes (config, checkpoints, summary, predictions, log, W&B files); the CLI
claims it (``run_folder_place``, ``resumed_run_folder``: where, from the command's config) and
puts a ``RunFolder`` callback on the trainer. Without the CLI a run's folder is its
logger's. A ``fit`` stopped by Ctrl-C or SIGTERM leaves its folder resumable (``StopCleanly``).
Nothing here trains or evaluates.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

RUN_FOLDER_ENV = "DAM_LIGHTNING_RUN_FOLDER"
"""Set by rank 0 before Lightning starts the other processes of a run on this machine, which
inherit it and so know the folder without creating one of their own."""

LOG_FILE = "log.txt"

UNFINISHED_FILE = "unfinished.txt"
"""In a run folder while ``fit`` has not finished (running, stopped or killed): what happened and
the command that resumes it. Removed when the run, or the run resuming it, ends well."""


def run_directory(trainer: L.Trainer) -> str:
    """The folder of this run: the CLI's ``RunFolder``; without one, ``save_dir/name/version``
    of the logger, the folder ``ModelCheckpoint`` puts ``checkpoints/`` in; without a logger,
    ``default_root_dir``."""
    for callback in trainer.callbacks:
        if isinstance(callback, RunFolder):
            return callback.path
    if len(trainer.loggers) != 1:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(save_dir, str(logger.name), version)


def claim_run_folder(parent: str, name: str) -> str:
    """Create and return a new folder ``parent/name`` (``name-1``, ``name-2``... if taken); the
    creation is atomic (``mkdir``), so two runs started in the same second never share one.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> [os.path.basename(claim_run_folder(root, "2026-01-02_03-04-05")) for _ in range(2)]
        ['2026-01-02_03-04-05', '2026-01-02_03-04-05-1']
    """
    os.makedirs(parent, exist_ok=True)
    candidate, n = os.path.join(parent, name), 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = os.path.join(parent, f"{name}-{n}")


def timestamp() -> str:
    """The local date and time as a folder name: ``2026-12-02_01-09-37``."""
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def launch_rank() -> int:
    """This process's rank as the launcher (Lightning, torchrun, SLURM) announced it in the
    environment, before any process group exists: 0 for the process that owns the run folder.
    A node other than the first counts as non-zero even where its local rank is 0."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(key, "0")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


class RunFolder(L.Callback):
    """The folder of one CLI run: ``run_directory`` returns it, ``ModelCheckpoint`` callbacks
    without a ``dirpath`` write into its ``checkpoints/``, and rank 0 writes ``log.txt`` there:
    every message of Lightning and dam_lightning at INFO level and above, including the ones the
    CLI keeps off the screen. Under DDP all processes take rank 0's folder.

    Args:
        path: the run folder (created by the caller on rank 0).
        resumed_from: the checkpoint a resumed run continues, noted in the log.
        checkpoints: the folder for ``ModelCheckpoint`` callbacks without a ``dirpath``; default
            ``<path>/checkpoints`` (an evaluation command passes the folder of the checkpoint it
            reads, where nothing is written, so Lightning does not warn that it moved).
        network: the class path of the network the run builds, kept in its checkpoints so that
            a command given a checkpoint of another network says so (``checkpoint_network``).

    Example:
        >>> RunFolder("runs/demo/2026-12-02_01-09-37").path
        'runs/demo/2026-12-02_01-09-37'
    """

    def __init__(
        self,
        path: str,
        resumed_from: str | None = None,
        checkpoints: str | None = None,
        network: str | None = None,
    ):
        self.path = path
        self.resumed_from = resumed_from
        self.checkpoints = checkpoints
        self.network = network
        self._handler: logging.Handler | None = None
        self._levels: dict[str, int] = {}

    @property
    def state_key(self) -> str:
        return "RunFolder"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path = trainer.strategy.broadcast(self.path)
        # absolute, as ModelCheckpoint makes its own: an evaluation reading the checkpoint
        # then finds the folder it was written to and does not warn that it moved
        checkpoints = os.path.realpath(self.checkpoints or os.path.join(self.path, "checkpoints"))
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = checkpoints
        if trainer.is_global_zero and self._handler is None:
            self._start_log()
            if self.resumed_from:
                logging.getLogger(__name__).info("Resuming from %s", self.resumed_from)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stop_log()

    def _start_log(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        self._handler = logging.FileHandler(os.path.join(self.path, LOG_FILE), encoding="utf-8")
        self._handler.setLevel(logging.INFO)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        for name in ("lightning.pytorch", "lightning.fabric", "dam_lightning"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
            logger.addHandler(self._handler)

    def log_exception(self, text: str) -> None:
        """Append ``text`` (a traceback) to the run's log, if this process writes one."""
        if self._handler is not None:
            self._handler.stream.write(text if text.endswith("\n") else text + "\n")
            self._handler.flush()

    def stop_log(self) -> None:
        """Detach the log file (the CLI calls it after it has logged a failure)."""
        if self._handler is None:
            return
        for name, level in self._levels.items():
            logger = logging.getLogger(name)
            logger.removeHandler(self._handler)
            logger.setLevel(level)
        self._handler.close()
        self._handler = None

    def state_dict(self) -> dict:
        return {"path": self.path, "network": self.network}

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run keeps its own new folder; where it came from is in its log."""


class StopCleanly(L.Callback):
    """Stop a ``fit`` at the end of a batch on Ctrl-C or SIGTERM (what SLURM and other schedulers
    send before a kill) and save ``last.ckpt`` there, atomically, so the run resumes where it
    stopped (``--ckpt_path <run>/checkpoints/last.ckpt``).

    SIGTERM is Lightning's own: it stops every process at the end of the batch (rank 0 tells the
    others) with ``SIGTERMException``. A first Ctrl-C asks for the same stop; a second one stops
    at once, through Lightning's ``KeyboardInterrupt`` path, and saves nothing (mid-batch, the
    networks and optimisers may be half-updated).

    Attributes:
        reason: ``"SIGTERM"``, ``"Ctrl-C"``, ``"Ctrl-C twice"`` or None (not stopped).
        saved: the checkpoint written when it stopped, or None.
        step: the global step at which it stopped.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.saved: str | None = None
        self.step: int | None = None
        self._trainer: L.Trainer | None = None
        self._previous_handler = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        self._previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum, frame) -> None:
        if self.reason is not None:
            self.reason = "Ctrl-C twice"
            raise KeyboardInterrupt
        self.reason = "Ctrl-C"
        rank_zero_info(
            "\nCtrl-C: stopping at the end of this batch and saving last.ckpt (Ctrl-C again "
            "stops at once, without saving)"
        )
        # Lightning's flag for SIGTERM: the training loop stops at the end of the batch and
        # broadcasts the stop to the other processes. It has no public setter.
        # checked on lightning 2.6.6
        connector = getattr(self._trainer, "_signal_connector", None)
        if connector is not None:
            connector.received_sigterm = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.step = trainer.global_step
        if isinstance(exception, KeyboardInterrupt):
            self.reason = "Ctrl-C twice"
        if not isinstance(exception, SIGTERMException):
            return
        self.reason = self.reason or "SIGTERM"
        self.saved = last_checkpoint_path(trainer)
        partial = os.path.join(os.path.dirname(self.saved), ".last.ckpt.partial")
        # every process takes part, rank 0 writes; optimisers and loops too, to resume
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, self.saved)  # a kill while writing leaves the old last.ckpt

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """``last.ckpt`` in the folder of the run's ``ModelCheckpoint`` (the run folder's
    ``checkpoints/`` under the CLI), where Lightning's ``save_last`` writes it too."""
    folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    folder = folders[0] if folders else os.path.join(run_directory(trainer), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
    return os.path.join(folder, name)


def checkpoint_network(blob: dict, path: str) -> str | None:
    """The class path of the network a checkpoint holds: what its ``RunFolder`` recorded, else
    what the ``config.yaml`` of the run that wrote it names (``model.init_args.net``); None when
    neither says.

    Example:
        >>> checkpoint_network({"callbacks": {"RunFolder": {"network": "m.LeNet"}}}, "x.ckpt")
        'm.LeNet'
    """
    state = blob.get("callbacks", {}).get("RunFolder") if isinstance(blob, dict) else None
    state = state if isinstance(state, dict) else {}
    if state.get("network"):
        return str(state["network"])
    folder = state.get("path") or os.path.dirname(os.path.dirname(os.path.abspath(path)))
    try:
        with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as f:
            config = yaml.safe_load(f)
        net = config["model"]["init_args"]["net"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    net = net.get("class_path") if isinstance(net, dict) else net
    return str(net) if net else None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename, so a crash or
    a kill leaves either the old file or the new one, never a truncated one. The file gets the
    permissions of any other new file (``0o666`` less the umask), not mkstemp's private 0o600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """``atomic_write_bytes`` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write_bytes``: a file of weights that later runs reuse
    is either whole or absent, never truncated by a kill."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(os.fspath(path), buffer.getvalue())


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def unused_path(path: str) -> str:
    """``path`` if free, else ``stem-1.ext``, ``stem-2.ext``...: never overwrite an earlier run.

    The name is claimed by creating an empty file with ``O_EXCL``, so two runs started at the
    same moment can never get the same one; the caller then overwrites that file.
    """
    stem, ext = os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    candidate, n = path, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{stem}-{n}{ext}"


# ---- where a command's run folder goes, read from its parsed config ----------------------------


def run_folder_place(config, command: str) -> tuple[str, str]:
    """(parent folder, folder name) of a command's run folder: ``fit`` goes to
    ``<save_dir>/<experiment>/<date>_<time>``; ``validate``, ``test`` and ``predict`` to
    ``<command>-<date>_<time>`` in the run folder of the checkpoint they read (its
    ``checkpoints/``'s parent), else beside the experiment's runs. ``<save_dir>`` and
    ``<experiment>`` are the first logger's ``save_dir`` and ``name``, else
    ``default_root_dir`` and the last config file's name."""
    loggers = logger_configs(config)
    init = loggers[0].get("init_args") if loggers else None
    root = (init.get("save_dir") if init else None) or config.trainer.default_root_dir or "."
    experiment = init.get("name") if init else None
    if not experiment and config.get("config"):
        experiment = Path(str(config.config[-1])).stem
    experiment = str(experiment or "run")
    if command == "fit":
        return os.path.join(str(root), experiment), timestamp()
    ckpt = config.get("ckpt_path")
    name = f"{command}-{timestamp()}"
    if ckpt and os.path.basename(os.path.dirname(os.path.abspath(ckpt))) == "checkpoints":
        return os.path.dirname(os.path.dirname(str(ckpt))), name
    return os.path.join(str(root), experiment), name


def resumed_run_folder(config, command: str) -> str | None:
    """The run folder a resumed ``fit`` continues in: that of its ``--ckpt_path`` when the
    checkpoint is in the ``checkpoints/`` of a run that has not finished (its
    ``unfinished.txt``): one folder for one run, and Lightning finds its checkpoints where
    it left them. None for a new run, also when the checkpoint is of a finished run (a
    branch from its epoch 0 must not overwrite it)."""
    ckpt = config.get("ckpt_path")
    if command != "fit" or not ckpt or not os.path.isfile(str(ckpt)):
        return None
    checkpoints = os.path.dirname(os.path.abspath(str(ckpt)))
    folder = os.path.dirname(checkpoints)
    if os.path.basename(checkpoints) != "checkpoints":
        return None
    if not os.path.isfile(os.path.join(folder, UNFINISHED_FILE)):
        return None
    return os.path.relpath(folder) if not os.path.isabs(str(ckpt)) else folder


def logger_configs(config) -> list:
    """The logger entries (``class_path``/``init_args`` namespaces) of a command's config."""
    loggers = config.trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [lg for lg in loggers if hasattr(lg, "get") and lg.get("class_path")]


def point_logger_at(logger, folder: str) -> None:
    """Make a logger's config write into the run folder: W&B's files go to ``<folder>/wandb``;
    a CSV or TensorBoard logger's ``save_dir/name/version`` becomes the folder itself."""
    init = logger.get("init_args")
    if init is None:
        return
    if logger.class_path.endswith("WandbLogger"):
        init["save_dir"] = folder
    elif "version" in init:
        parent, version = os.path.split(os.path.normpath(folder))
        init["save_dir"], init["name"] = os.path.split(parent)
        init["version"] = version
