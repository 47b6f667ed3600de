"""Progress on screen for the whole run and for the long phases outside Lightning's loops, and
the step that callbacks log at.

Lightning's training bar counts one epoch; ``RunProgressBar`` counts the run's budget. Gaussian
matching and the summary's scoring run inside one training batch, where Lightning shows nothing:
``Phase`` gives each its own bar (rank 0, only when the trainer shows bars) and logs how long it
took. Nothing here changes what a run computes.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_info

from dam_lightning.modules.gam import GAMAdaptModule

__all__ = [
    "Budget",
    "ConsoleAboveBars",
    "Phase",
    "RunProgress",
    "RunProgressBar",
    "announce",
    "logged_step",
    "run_budget",
]

log = logging.getLogger(__name__)

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]"
"""Lightning's bar layout with the unit after the count (``51/113 layers``)."""


@dataclass(frozen=True)
class Budget:
    """How far a fit is through what it was told to do: ``done`` of ``total`` ``unit``."""

    total: int
    done: int
    unit: str


def run_budget(trainer: L.Trainer, batches_this_epoch: int) -> Budget | None:
    """The run's budget: ``max_steps`` optimiser steps when set (GAM steps twice per batch, so
    steps, not batches, are what ends the run), else ``max_epochs`` epochs of batches; None
    when neither bounds the run.

    Example:
        >>> from types import SimpleNamespace as Trainer
        >>> run_budget(Trainer(max_steps=1800, global_step=1210), 3)
        Budget(total=1800, done=1210, unit='steps')
        >>> run_budget(Trainer(max_steps=-1, max_epochs=33, num_training_batches=78,
        ...                    current_epoch=2), 3)
        Budget(total=2574, done=159, unit='batches')
    """
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return Budget(trainer.max_steps, trainer.global_step, "steps")
    per_epoch = trainer.num_training_batches
    if not trainer.max_epochs or trainer.max_epochs < 1 or not math.isfinite(per_epoch):
        return None
    done = trainer.current_epoch * per_epoch + batches_this_epoch
    return Budget(trainer.max_epochs * int(per_epoch), int(done), "batches")


class RunProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar counting the whole run instead of one epoch: a 1,800-step run shows
    ``Adaptation, epoch 7: 67%| 1210/1800 steps``, not ``Epoch 7: 45/187`` that starts again
    every epoch. The stage (source training or adaptation) is named for a GAM module. Without
    a budget (no ``max_steps``, no ``max_epochs``) it is Lightning's bar. While it trains, what
    Lightning's loggers print (a stage's end, Gaussian matching) goes on a line of its own above
    the bar instead of being glued onto it (``ConsoleAboveBars``).

    Example:
        >>> RunProgressBar(refresh_rate=10).refresh_rate
        10
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate, process_position, leave)
        self._console = ConsoleAboveBars()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.is_enabled:
            self._console.install()
        budget = run_budget(trainer, 0)
        if budget is not None:  # a resumed run's rate counts only the batches it ran
            self.train_progress_bar.initial = budget.done

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._console.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._console.restore()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        budget = run_budget(trainer, 0)
        if budget is None:
            super().on_train_epoch_start(trainer, pl_module)
            return
        bar = self.train_progress_bar
        bar.total, bar.unit = budget.total, budget.unit
        self._show(bar, budget, trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        budget = run_budget(trainer, batch_idx + 1)
        if budget is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        last = budget.done >= budget.total
        if self.is_enabled and ((batch_idx + 1) % self.refresh_rate == 0 or last):
            self._show(self.train_progress_bar, budget, trainer, pl_module)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    @staticmethod
    def _show(bar, budget: Budget, trainer: L.Trainer, pl_module) -> None:
        if bar.disable:
            return
        bar.set_description(f"{_stage(pl_module)}, epoch {trainer.current_epoch}", refresh=False)
        bar.n = budget.done
        bar.refresh()

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar, with the unit (steps or batches) after the count."""
        return Tqdm(
            desc=self.train_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=BAR_FORMAT.replace("]", "{postfix}]"),
        )


class ConsoleAboveBars:
    """While installed, the console handlers of Lightning's loggers (where ``rank_zero_info``
    prints) write with the TQDM bars cleared first and drawn again after, so a message gets a
    line of its own instead of being glued onto the training bar. Their filters, levels and
    formats are kept: each handler is wrapped, not replaced.

    Example:
        >>> demo = logging.getLogger("demo")
        >>> demo.addHandler(logging.StreamHandler(sys.stderr))
        >>> console = ConsoleAboveBars(("demo",))
        >>> console.install(); type(demo.handlers[0]).__name__
        '_AboveBars'
        >>> console.restore(); type(demo.handlers[0]).__name__
        'StreamHandler'
    """

    def __init__(self, loggers: tuple[str, ...] = ("lightning.pytorch", "lightning.fabric")):
        self.loggers = loggers

    def install(self) -> None:
        for name in self.loggers:
            logger = logging.getLogger(name)
            logger.handlers = [_AboveBars(h) if _is_console(h) else h for h in logger.handlers]

    def restore(self) -> None:
        """Unwrap the handlers (others added or removed meanwhile, as the run's log file, stay
        as they are)."""
        for name in self.loggers:
            logger = logging.getLogger(name)
            handlers = logger.handlers
            logger.handlers = [h.handler if isinstance(h, _AboveBars) else h for h in handlers]


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return type(handler) is logging.StreamHandler and stream in (sys.stdout, sys.stderr)


class _AboveBars(logging.Handler):
    """``handler``, with every TQDM bar cleared while it writes a record."""

    def __init__(self, handler: logging.Handler):
        super().__init__(handler.level)
        self.handler = handler

    def handle(self, record: logging.LogRecord) -> bool:
        with Tqdm.external_write_mode(file=self.handler.stream):
            return self.handler.handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        self.handler.emit(record)


def _stage(pl_module) -> str:
    if not isinstance(pl_module, GAMAdaptModule):
        return "Training"
    return "Adaptation" if pl_module.adapting else "Source training"


class RunProgress(L.Callback):
    """List it in a config's ``trainer.callbacks`` to get ``RunProgressBar`` instead of
    Lightning's per-epoch bar. A ``ProgressBar`` in the config itself would make Lightning refuse
    ``--trainer.enable_progress_bar false``; this callback instead puts a ``RunProgressBar`` (same
    refresh rate and position) in the place of the stock bar the trainer made, and does nothing
    when there is none (bars disabled) or it is another kind (a ``RichProgressBar``).

    Example:
        >>> trainer = L.Trainer(callbacks=[RunProgress()], logger=False)
        >>> RunProgress().setup(trainer, None, "fit")
        >>> type(trainer.progress_bar_callback).__name__
        'RunProgressBar'
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for index, callback in enumerate(trainer.callbacks):
            if type(callback) is TQDMProgressBar:
                bar = RunProgressBar(callback.refresh_rate, callback.process_position)
                trainer.callbacks[index] = bar
                if self not in trainer.callbacks[index:]:  # its setup has run already: run ours
                    bar.setup(trainer, pl_module, stage)


class Phase:
    """A long step outside Lightning's loops, such as Gaussian matching or scoring the target:
    used as ``with Phase(trainer, "Gaussian matching", 113, "layers") as phase:`` and
    ``phase.advance()`` per unit done, it shows a bar with its name and count on its own line
    (below the training bar; rank 0 only; only when the trainer shows a TQDM bar) and logs
    ``Gaussian matching: 113 layers in 12.3 s`` (the run's ``log.txt``) when it ends.

    Example:
        >>> from types import SimpleNamespace as Trainer
        >>> with Phase(Trainer(is_global_zero=True, progress_bar_callback=None), "Scoring", 2,
        ...            "batches") as phase:
        ...     batches = list(phase.track(["a", "b"]))
        >>> phase.count, batches
        (2, ['a', 'b'])
    """

    def __init__(self, trainer: L.Trainer, name: str, total: int | None, unit: str):
        self.trainer, self.name, self.total, self.unit = trainer, name, total, unit
        self.count = 0
        self.seconds = 0.0
        self.bar: Tqdm | None = None
        self._start = 0.0

    def __enter__(self) -> Phase:
        self._start = time.perf_counter()
        self.bar = _phase_bar(self.trainer, self.name, self.total, self.unit)
        return self

    def advance(self, *_) -> None:
        """One more unit done (the arguments, such as a layer's name, are ignored)."""
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def track(self, items: Iterable) -> Iterator:
        """``items`` one by one, a unit counted once the consumer is done with each."""
        for item in items:
            yield item
            self.advance()

    def __exit__(self, error_type, *_) -> None:
        self.seconds = time.perf_counter() - self._start
        if self.bar is not None:
            self.bar.close()
        if error_type is None and self.trainer.is_global_zero:
            log.info("%s: %d %s in %.1f s", self.name, self.count, self.unit, self.seconds)


def _phase_bar(trainer: L.Trainer, name: str, total: int | None, unit: str) -> Tqdm | None:
    """A bar where Lightning puts its validation bar (the line under the training bar), with the
    trainer's bar's settings; None on other ranks or when the trainer shows no TQDM bar."""
    progress = trainer.progress_bar_callback
    shown = isinstance(progress, TQDMProgressBar) and progress.is_enabled
    if not (shown and trainer.is_global_zero):
        return None
    return Tqdm(
        desc=name,
        total=total,
        unit=unit,
        position=2 * progress.process_position + 1,
        leave=False,
        dynamic_ncols=True,
        file=sys.stdout,  # as Lightning's bars
        bar_format=BAR_FORMAT,
    )


def announce(message: str) -> None:
    """Log ``message`` on rank 0 (screen and ``log.txt``) on a line of its own: any TQDM bar on
    the terminal is cleared first and drawn again after, so the line is not glued onto the
    training bar."""
    with Tqdm.external_write_mode():
        rank_zero_info(message)


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning logs metrics at now: the number of batches trained (``global_step``
    counts optimiser steps, two per batch in GAM's manual optimisation), so that what a
    callback logs (pictures, tables) sits at the same ``trainer/global_step`` as the metrics
    it explains."""
    epoch_loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))
