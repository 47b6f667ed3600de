"""``preflight``: a few steps of every stage of a config, timed on the hardware present, and
what the whole run will cost (seconds per step, peak device memory, loader against step
throughput, estimated wall time). The answer to "will it fit on my card" and "how long will it
take" before a multi-hour run starts.

It measures the configured module and data on one device with a throwaway Trainer (no logger,
no checkpoints); it never trains anything that is kept. ``synthetic_data_config`` rewrites a
config whose datasets are not on disk yet to random stand-ins of the same sizes.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable

import lightning as L
import torch

from dam_lightning.callbacks.gaussian_matching import GaussianMatching
from dam_lightning.callbacks.summary import AdaptationSummary
from dam_lightning.data.synthetic import dataset_class, synthetic_item_shape
from dam_lightning.modules.gam import GAMAdaptModule

__all__ = [
    "PreflightReport",
    "StageCost",
    "random_instead_of_missing_weights",
    "run_preflight",
    "synthetic_data_config",
]

WARMUP = 2  # steps per stage not timed: cuDNN autotuning, allocator growth, worker start-up
DATASET_ROLES = ("source", "target", "target_val", "source_val", "target_test")


@dataclasses.dataclass
class StageCost:
    """What one stage of a run costs, measured on one device."""

    stage: str
    """``source`` (supervised F_s steps), ``gaussian_matching``, ``gam`` or ``validation``."""
    step_seconds: float
    """Median wall time of one step (one batch; Gaussian matching: one whole matching)."""
    peak_memory_mib: float | None
    """Peak device memory over the timed steps (None on a CPU: not measured)."""
    loader_items_per_second: float | None
    """Items the stage's DataLoaders deliver per second with the configured workers (None:
    not measured, e.g. synthetic data or matching's own calibration loader)."""
    step_items_per_second: float
    """Items one step consumes per second of its time (source + target images for GAM)."""
    steps_in_run: int | None = None
    """How many such steps the configured run takes (None: unknown)."""

    @property
    def bottleneck(self) -> str:
        loader = self.loader_items_per_second
        return "loader" if loader is not None and loader < self.step_items_per_second else "compute"


@dataclasses.dataclass
class PreflightReport:
    """``preflight.json``: the stages, the bottleneck of the longest one and the run's time."""

    stages: list[StageCost]
    bottleneck: str
    estimated_seconds: float | None
    device: str
    precision: str
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def table(self) -> str:
        """The report as the terminal shows it."""
        head = (
            f"{'stage':<18} {'s/step':>9} {'peak MiB':>9} {'loader it/s':>12} "
            f"{'step it/s':>10} {'steps':>8}"
        )
        rows = [
            f"{s.stage:<18} {s.step_seconds:>9.4f} {_number(s.peak_memory_mib, 0):>9} "
            f"{_number(s.loader_items_per_second, 1):>12} {s.step_items_per_second:>10.1f} "
            f"{_number(s.steps_in_run, 0):>8}"
            for s in self.stages
        ]
        total = "unknown" if self.estimated_seconds is None else _duration(self.estimated_seconds)
        lines = [
            f"preflight on {self.device}, {self.precision}:",
            head,
            *rows,
            f"bottleneck: {self.bottleneck}; estimated run time: {total}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


# ---- synthetic data: the config's datasets, not on disk yet --------------------------------


def synthetic_data_config(data, steps: int) -> list[str]:
    """Replace, in the ``data`` section of a parsed config (jsonargparse namespaces), every
    dataset read from files (init args with a ``root``) by a ``SyntheticLike`` of the same
    class, item shape and labelled-ness, long enough for ``steps`` + warm-up batches of every
    stage. Datasets built in memory (the demos') stay. Returns the roles replaced."""
    from jsonargparse import Namespace  # only the CLI calls this; the GPU check never does

    replaced = []
    for role in DATASET_ROLES:
        entry = data.get(role)
        init = entry.get("init_args") if isinstance(entry, Namespace) else None
        if init is None or "root" not in init:
            continue
        transform = init.get("transform")
        transform = transform.as_dict() if isinstance(transform, Namespace) else transform
        labelled = _labelled(entry.class_path, init)
        batch = data.get("batch_size") or 1
        data[role] = Namespace(
            class_path="dam_lightning.data.synthetic.SyntheticLike",
            init_args=Namespace(
                like=entry.class_path,
                shape=synthetic_item_shape(entry.class_path, transform),
                length=4 * batch * (WARMUP + steps + 1),
                labelled=labelled,
            ),
        )
        replaced.append(role)
    return replaced


def _labelled(class_path: str, init) -> bool:
    """Whether the configured dataset yields labels: its ``labelled`` argument, else that
    argument's default (None: Cityscapes' rule, every split but "test"); True for a class
    without one (the digit sets)."""
    parameter = inspect.signature(dataset_class(class_path)).parameters.get("labelled")
    if parameter is None:
        return True
    labelled = init.get("labelled", parameter.default)
    return init.get("split", "val") != "test" if labelled is None else bool(labelled)


def random_instead_of_missing_weights(model) -> list[str]:
    """Set to None, in the ``model`` section of a parsed config, the network's weight files
    (``weights``, ``backbone_weights``) that do not exist yet: with ``--synthetic true`` the
    cost is measured before anything is downloaded or trained, and random weights cost the same.
    Returns a note per file."""
    net = (model.get("init_args") or {}).get("net") if model is not None else None
    init = net.get("init_args") if net is not None and hasattr(net, "get") else None
    notes = []
    for key in ("weights", "backbone_weights"):
        path = init.get(key) if init is not None else None
        if isinstance(path, str) and not os.path.exists(path):
            init[key] = None
            notes.append(f"{key}: {path} does not exist yet, random weights measured instead")
    return notes


# ---- measuring ----------------------------------------------------------------------------


class _Device:
    """Synchronise, reset and read the peak memory of the one device measured."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None


class _StepClock(L.Callback):
    """Wall time and peak memory of every training and validation batch, by stage; first in
    the callback list, so a batch's time includes the callbacks after it (Gaussian matching)."""

    def __init__(self, device: _Device):
        self.device = device
        self.batches: list[tuple[str, float, float | None]] = []
        self.matching: list[tuple[float, float | None]] = []
        self._stage, self._start, self._report = "", 0.0, None

    def _begin(self, stage: str) -> None:
        self.device.sync()
        self.device.reset_peak()
        self._stage, self._start = stage, time.perf_counter()

    def _end(self) -> None:
        self.device.sync()
        self.batches.append(
            (self._stage, time.perf_counter() - self._start, self.device.peak_mib())
        )

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        adapting = getattr(module, "adapting", False)
        self._report = getattr(module, "gaussian_report", None)
        self._begin("gam" if adapting else "source")

    def after_matching(self, module) -> None:
        """Called right after the GaussianMatching callbacks: when one has just matched, its
        time is Gaussian matching's, and this batch's step starts afresh."""
        if getattr(module, "gaussian_report", None) is self._report:
            return
        self.device.sync()
        self.matching.append((time.perf_counter() - self._start, self.device.peak_mib()))
        self._begin("gam")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._end()

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self._begin("validation")

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._end()


class _AfterMatching(L.Callback):
    """Placed after the GaussianMatching callbacks: tells the clock that they have run."""

    def __init__(self, clock: _StepClock):
        self.clock = clock

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.clock.after_matching(module)


def _measuring_trainer(configured: L.Trainer, callbacks: list, folder: str, **limits) -> L.Trainer:
    """A one-device Trainer with the configured device and precision, nothing written."""
    device = configured.strategy.root_device
    devices = [device.index or 0] if device.type == "cuda" else 1
    return L.Trainer(
        accelerator=device.type,
        devices=devices,
        precision=configured.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=folder,
        callbacks=callbacks,
        **limits,
    )


def _batch_size(batch) -> int:
    """Items in a batch: a tensor, an (x, y) pair, or a dict of domains (summed)."""
    if isinstance(batch, dict):
        return sum(_batch_size(b) for b in batch.values())
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    return len(batch)


def _loader_items_per_second(loaders: Iterable, batches: int, parallel: bool) -> float:
    """Items/s the loaders deliver together, timed over ``batches`` batches after the first
    (which pays for starting workers): loaders with workers decode side by side, so the slowest
    decides; without workers the main process decodes one loader after the other."""
    seconds, items = [], 0
    for loader in loaders:
        iterator = iter(loader)
        items += _batch_size(next(iterator)) * batches
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds.append(time.perf_counter() - start)
    total = max(seconds) if parallel else sum(seconds)
    return items / total if total > 0 else math.inf


def run_preflight(
    configured: L.Trainer, model: L.LightningModule, datamodule, steps: int, synthetic: bool
) -> PreflightReport:
    """Time ``steps`` steps of each stage of ``model`` on ``datamodule`` (after ``WARMUP``
    untimed ones) on ``configured``'s first device and precision, and estimate the run that
    ``configured`` would train."""
    device = _Device(configured.strategy.root_device)
    notes = [
        f"one device, {WARMUP} warm-up + {steps} timed steps per stage; a multi-device run "
        "adds gradient communication to each step"
    ]
    clock = _StepClock(device)
    matching = [c for c in configured.callbacks if isinstance(c, GaussianMatching)]
    callbacks = [clock, *matching, _AfterMatching(clock)]
    budget = WARMUP + steps
    counts = _steps_in_run(configured, model, datamodule, matching, synthetic)
    with tempfile.TemporaryDirectory() as folder:
        max_steps = _prepare_stages(model, budget, folder, notes)
        _measuring_trainer(
            configured, callbacks, folder, max_steps=max_steps, max_epochs=-1, limit_val_batches=0
        ).fit(model, datamodule=datamodule)
        _measuring_trainer(configured, [clock], folder, limit_val_batches=budget).validate(
            model, datamodule=datamodule, verbose=False
        )
    calibration = matching[0].calibration_batches if matching else 0
    stages = _stage_costs(clock, datamodule, steps, synthetic, calibration)
    for stage in stages:
        stage.steps_in_run = counts.get(stage.stage)
    if synthetic:
        notes.append("synthetic data: the loader was not measured (--synthetic true)")
    return _report(stages, device, configured.precision, notes)


def _prepare_stages(model, budget: int, folder: str, notes: list[str]) -> int:
    """Set ``model`` up for ``budget`` batches of each of its training stages; returns the
    ``max_steps`` that covers them (a GAM batch is two optimiser steps)."""
    if not isinstance(model, GAMAdaptModule):
        return budget
    if model.trains_source_network:
        model.hparams.source_steps = budget
        return budget + 2 * (budget + 1)
    weights = model.hparams.source_weights
    if weights and not os.path.isfile(weights):
        notes.append(f"F_s has random weights: {weights} does not exist yet")
        model.hparams.source_weights = os.path.join(folder, "random_source.pt")
        torch.save(model.source_net.state_dict(), model.hparams.source_weights)
    return 2 * (budget + 1)  # one more batch: the first adaptation batch includes matching


def _stage_costs(
    clock: _StepClock, datamodule, steps: int, synthetic: bool, calibration_batches: int
) -> list[StageCost]:
    stages = []
    for name in ("source", "gam", "validation"):
        timed = [b for b in clock.batches if b[0] == name][WARMUP:][:steps]
        if not timed:
            continue
        seconds = statistics.median(t for _, t, _ in timed)
        peaks = [p for _, _, p in timed if p is not None]
        items = _items_per_step(datamodule, name)
        loader = None if synthetic else _stage_loader_rate(datamodule, name, steps)
        stages.append(
            StageCost(name, seconds, max(peaks) if peaks else None, loader, items / seconds)
        )
    if clock.matching:
        seconds, peak = clock.matching[0]
        items = _items_per_step(datamodule, "gam") * calibration_batches
        stages.insert(
            -1 if stages[-1].stage == "validation" else len(stages),
            StageCost("gaussian_matching", seconds, peak, None, items / seconds),
        )
    return stages


def _items_per_step(datamodule, stage: str) -> int:
    sizes = datamodule.batch_sizes
    return {
        "source": sizes["source"],
        "gam": sizes["source"] + sizes["target"],
        "validation": sizes["eval"],
    }[stage]


def _stage_loader_rate(datamodule, stage: str, steps: int) -> float:
    if stage == "validation":
        loaders = datamodule.val_dataloader()[:1]
    elif stage == "source":
        loaders = [datamodule.source_dataloader()]
    else:
        loaders = [datamodule.source_dataloader(), datamodule.target_dataloader()]
    batches = max(1, min(steps, *(len(loader) - 1 for loader in loaders)))
    return _loader_items_per_second(loaders, batches, parallel=datamodule.num_workers > 0)


# ---- the estimate -------------------------------------------------------------------------


def _steps_in_run(configured, model, datamodule, matching, synthetic) -> dict[str, int]:
    """How many steps of each stage the configured run takes (stages whose count cannot be
    known are left out): from max_steps, or max_epochs x batches per epoch."""
    per_epoch = None if synthetic else _train_batches_per_epoch(configured, datamodule)
    is_gam = isinstance(model, GAMAdaptModule)
    first = model.hparams.source_steps if is_gam and model.trains_source_network else 0
    if configured.max_steps and configured.max_steps > 0:
        total = first + (configured.max_steps - first) // 2 if is_gam else configured.max_steps
    elif per_epoch is not None and configured.max_epochs and configured.max_epochs > 0:
        total = configured.max_epochs * per_epoch
    else:
        return {}
    counts = {"gam": total - first, "source": first} if is_gam else {"source": total}
    epochs = (total / per_epoch) if per_epoch else None
    if not synthetic:
        passes = _validations(configured, total, epochs) * _val_batches(configured, datamodule)
        if is_gam and any(isinstance(c, AdaptationSummary) for c in configured.callbacks):
            # the summary scores the whole target val set: source only, matched, adapted
            passes += (2 + bool(matching)) * len(datamodule.val_dataloader()[0])
        counts["validation"] = passes
    if matching and epochs is not None:
        every = matching[0].every_n_epochs
        counts["gaussian_matching"] = 1 + (int(epochs) // every if every else 0)
    elif matching:
        counts["gaussian_matching"] = 1
    return counts


def _train_batches_per_epoch(configured, datamodule) -> int:
    loaders = [datamodule.source_dataloader(), datamodule.target_dataloader()]
    longest = max(len(loader) for loader in loaders)
    return _limited(configured.limit_train_batches, longest)


def _val_batches(configured, datamodule) -> int:
    """Validation batches per validation pass of the trainer (``limit_val_batches`` applied)."""
    return sum(_limited(configured.limit_val_batches, len(v)) for v in datamodule.val_dataloader())


def _limited(limit, batches: int) -> int:
    return int(limit * batches) if isinstance(limit, float) else min(int(limit), batches)


def _validations(configured, total_batches: int, epochs: float | None) -> int:
    interval = configured.val_check_interval
    if isinstance(interval, int):
        return total_batches // interval
    every = configured.check_val_every_n_epoch or 1
    return 0 if epochs is None else int(epochs) // every * max(1, round(1 / interval))


def _report(stages: list[StageCost], device: _Device, precision: str, notes) -> PreflightReport:
    known = [s for s in stages if s.steps_in_run is not None]
    estimated = sum(s.step_seconds * s.steps_in_run for s in known) if known else None
    if len(known) < len(stages):
        unknown = [s.stage for s in stages if s.steps_in_run is None]
        notes.append(f"steps in the run unknown for {unknown}: not in the estimate")
    training = [s for s in stages if s.stage in ("source", "gam")]
    longest = max(training, key=lambda s: s.step_seconds * (s.steps_in_run or 1))
    name = torch.cuda.get_device_name(device.device) if device.cuda else "CPU"
    return PreflightReport(
        stages,
        f"{longest.bottleneck} ({longest.stage})",
        estimated,
        f"{device.device} ({name})",
        str(precision),
        notes,
    )
