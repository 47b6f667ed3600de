"""``PredictionWriter``: what ``python -m dam_lightning predict`` leaves on disk.

Segmentation: per image a labelId (or trainId) PNG, a colour PNG and an overlay, each kind in its
own sub-folder; classification: one CSV. The writer only converts and writes what ``predict_step``
returns; it never runs the network and changes no prediction beyond resizing it to the image's
native size. Every file is written through a temporary file and an atomic rename.

Segmentation images are written by a small thread pool while the network predicts the next batch
(PNG encoding releases the GIL); at most ``max_pending`` images wait or are being written at any
time, so neither the queue nor host memory grows with the number of images.
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import os
import threading
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor
from torch.utils.data import Subset

from dam_lightning.data.attributes import dataset_info
from dam_lightning.data.labels import (
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    DatasetInfo,
    colour_table,
    lookup_table,
)
from dam_lightning.errors import ConfigError, WrongTypeError
from dam_lightning.modules.base import EvaluatingModule
from dam_lightning.runs import run_directory

__all__ = ["PredictionWriteError", "PredictionWriter", "distinct_palette"]

CSV_COLUMNS = ("index", "prediction", "confidence", "label")


def distinct_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """``num_classes`` well-separated RGB colours (golden-ratio hue steps, alternating saturation
    and value), for datasets with more classes than Cityscapes and no palette of their own.

    Example:
        >>> palette = distinct_palette(40)
        >>> len(palette), len(set(palette)), (0, 0, 0) in palette
        (40, 40, False)
    """
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        saturation = 0.9 if i % 2 == 0 else 0.55
        value = 0.95 if (i // 2) % 2 == 0 else 0.7
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colours)


def default_palette(num_classes: int | None) -> tuple[tuple[int, int, int], ...]:
    """The Cityscapes colours for up to 19 classes (or an unknown number), else
    :func:`distinct_palette`.

    Example:
        >>> default_palette(19) == CITYSCAPES_PALETTE, len(default_palette(30))
        (True, 30)
    """
    if num_classes is None or num_classes <= len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE
    return distinct_palette(num_classes)


PNG_ENCODING = {"compress_level": 1, "compress_type": zlib.Z_RLE}
"""How the PNGs are compressed: zlib's run-length strategy at level 1 writes a 1024x2048 overlay
in half the time of PIL's default (level 6) at the same size (id maps and colour masks within
a few kB), on a CPU (docs/results/segmentation_speed.md); the pixels are the same."""


def save_png_atomically(image: Image.Image, path: str) -> None:
    """Save ``image`` as PNG at ``path`` (folders created) through a hidden temporary file in the
    same folder and an atomic rename: a crash leaves the old file or the new one, and the
    temporary name never matches the Cityscapes benchmark's ``<city>_<seq>_<frame>*.png``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    unique = f"{os.getpid()}-{threading.get_ident()}"  # writer threads never share a temporary
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{unique}.tmp")
    try:
        image.save(tmp, format="PNG", **PNG_ENCODING)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class PredictionWriteError(RuntimeError):
    """Writing one prediction failed (in a writer thread or not); the message names the file, the
    original error is the cause."""


class _WritePool:
    """Runs write jobs on ``workers`` threads with at most ``max_pending`` jobs submitted and not
    yet finished: ``submit`` blocks on the oldest job while the queue is full and raises the first
    failure it meets in the caller's thread. ``workers=0`` runs each job at once, in the caller.

    Example:
        >>> pool = _WritePool(workers=2, max_pending=3)
        >>> for k in range(10):
        ...     pool.submit(lambda: None)
        >>> pool.finish()
        >>> pool.peak_pending <= 3
        True
    """

    def __init__(self, workers: int, max_pending: int):
        self.max_pending = max_pending
        self.peak_pending = 0  # the most jobs ever waiting or running at once
        self._pending: deque[Future] = deque()
        self._executor = (
            ThreadPoolExecutor(workers, thread_name_prefix="PredictionWriter") if workers else None
        )

    def submit(self, job: Callable[[], None]) -> None:
        if self._executor is None:
            job()
            return
        while self._pending and (self._pending[0].done() or len(self) >= self.max_pending):
            self._pending.popleft().result()  # re-raises the job's error here
        self._pending.append(self._executor.submit(job))
        self.peak_pending = max(self.peak_pending, len(self))

    def __len__(self) -> int:
        return len(self._pending)

    def finish(self) -> None:
        """Wait for every job; the first failure cancels what has not started and is raised."""
        try:
            while self._pending:
                self._pending[0].result()
                self._pending.popleft()
        finally:
            self.close()

    def close(self) -> None:
        """Drop the jobs that have not started and wait for the running ones (after a failure:
        no thread writes once ``predict`` has returned)."""
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


class _DatasetView:
    """A prediction dataset seen through ``Subset`` wrappers: the optional per-item methods
    (``item_name``, ``image_path``) are taken from the outermost dataset that has them, with the
    index mapped to that level; ``info`` (palette, label_ids, num_classes) from ``dataset_info``."""

    def __init__(self, dataset: Any):
        self.chain = [dataset]
        while isinstance(self.chain[-1], Subset):
            self.chain.append(self.chain[-1].dataset)
        self.info: DatasetInfo | None = dataset_info(dataset, None)

    def call(self, method: str, index: int) -> Any:
        for dataset in self.chain:
            if callable(getattr(dataset, method, None)):
                return getattr(dataset, method)(index)
            if isinstance(dataset, Subset):
                index = int(dataset.indices[index])
        return None

    def item_name(self, index: int) -> str:
        name = self.call("item_name", index)
        if name is None:
            return f"{index:06d}"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConfigError(
                f"item_name({index}) returned {name!r}; it must be a relative path without '..' "
                "(e.g. 'frankfurt/frankfurt_000000_000294')"
            )
        return str(name)


def _prediction_dataset(trainer: L.Trainer, dataloader_idx: int) -> Any:
    """The dataset behind predict dataloader ``dataloader_idx``."""
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[dataloader_idx]
    return getattr(loaders, "dataset", None)


def _number_of_loaders(trainer: L.Trainer) -> int:
    loaders = trainer.predict_dataloaders
    return len(loaders) if isinstance(loaders, (list, tuple, dict)) else 1


def _unpack(prediction: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(prediction, confidence, label) where ``predict_step`` left them, from its contract
    ``{"prediction", "confidence", "label"}``; a bare tensor is taken as the prediction."""
    if isinstance(prediction, Tensor):
        return prediction.detach(), None, None
    if not isinstance(prediction, dict) or "prediction" not in prediction:
        raise WrongTypeError(
            "PredictionWriter expects predict_step to return a tensor or a dict with keys "
            f"'prediction', 'confidence', 'label'; got {type(prediction).__name__}"
        )
    fields = [prediction.get(key) for key in ("prediction", "confidence", "label")]
    return tuple(None if t is None else torch.as_tensor(t).detach() for t in fields)


def _displayable(network_input: Tensor) -> np.ndarray:
    """A (C, H, W) network input (1 or 3 channels, any normalisation) as (H, W, 3) uint8 RGB,
    its values stretched from their minimum to their maximum."""
    x = network_input.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    rgb = (x * 255).round().to(torch.uint8).expand(3, *x.shape[1:])
    return rgb.permute(1, 2, 0).contiguous().numpy()


def _cpu(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.cpu()


class _SegmentationTables:
    """The 256-entry lookup tables of one dataset: trainId -> dataset-native id (or None to
    write trainIds) and trainId -> RGB."""

    def __init__(self, view: _DatasetView, module_num_classes: int | None):
        info = view.info
        palette = None if info is None else info.palette
        if palette is None:
            palette = default_palette(module_num_classes if info is None else info.num_classes)
        palette = tuple(tuple(int(v) for v in rgb) for rgb in palette)
        self.num_colours = len(palette)
        self.colours = colour_table(palette).numpy()
        self.ids: np.ndarray | None = None
        self.num_ids = IGNORE_INDEX  # trainIds are written as they are
        label_ids = None if info is None else info.label_ids
        if label_ids is not None:
            label_ids = [int(i) for i in label_ids]
            if any(not 0 <= i <= 255 for i in label_ids):
                raise ConfigError(f"label_ids {label_ids} do not fit a uint8 PNG (0..255)")
            self.num_ids = len(label_ids)
            table = lookup_table(dict(enumerate(label_ids)), fill=0)  # ignored pixels -> 0, void
            self.ids = table.to(torch.uint8).numpy()
        self.folder = "labelIds" if self.ids is not None else "trainIds"

    def check(self, train_ids: Tensor, name: str) -> None:
        """Refuse ids that have no colour (or no dataset id): they would be written as void."""
        valid = train_ids[train_ids != IGNORE_INDEX]
        if valid.numel() == 0:
            return
        low, high = valid.min().item(), valid.max().item()
        limit = min(self.num_colours, self.num_ids)
        if low < 0 or high >= limit:
            raise ConfigError(
                f"prediction for {name!r} holds trainId {low if low < 0 else high}, outside "
                f"0..{limit - 1} (the dataset's palette/label_ids) and not {IGNORE_INDEX}; give "
                "the dataset an `info` whose palette and label_ids have one entry per class"
            )


class PredictionWriter(BasePredictionWriter):
    """Writes each ``predict_step`` batch to ``output_dir``.

    ``predict_step`` returns ``{"prediction": int64 (N,) class ids or (N, H, W) trainIds,
    "confidence": float of the same shape or None, "label": same shape or None}`` (a bare
    prediction tensor is accepted). The dataset may offer ``item_name(index)`` (a relative path
    without extension, e.g. ``"frankfurt/frankfurt_000000_000294"``; default ``f"{index:06d}"``),
    ``image_path(index)`` and an ``info`` (``DatasetInfo``) whose ``palette`` (RGB per trainId;
    default Cityscapes' up to 19 classes) and ``label_ids`` (native id per trainId, e.g.
    ``CITYSCAPES_LABEL_IDS``) are used; ``Subset`` wrappers are seen through.

    Segmentation, per image, one folder per kind (so the Cityscapes benchmark's file matching,
    pointed at ``labelIds/``, finds exactly one file per image):

    - ``labelIds/<name>.png`` (mode "L", trainId -> label_ids, ignored -> 0), or
      ``trainIds/<name>.png`` when the dataset has no ``label_ids``;
    - ``colour/<name>.png``: palette colours, ignored pixels black;
    - ``overlay/<name>.png``: the input image blended with the colours (``overlay_alpha`` is the
      colour's weight; ignored pixels show the image); only with ``image_path``.

    When the prediction's size differs from the image's native size (predict sets without labels
    are fed resized), the id map is resized to the native size with nearest neighbour before
    anything is written; upsampling logits in the task gives smoother borders where it can.

    Classification: ``predictions.csv`` with columns ``index,prediction,confidence,label`` (empty
    when unknown), rows in batch order; under DDP one ``predictions-rank<r>.csv`` per rank. It
    appears at the end of ``predict``, renamed into place from a temporary file.

    With several predict dataloaders each gets a ``dataloader_<k>/`` sub-folder.

    Segmentation images are converted and written by ``workers`` threads while the network goes
    on predicting; at most ``max_pending`` images wait or are being written (``submit`` waits for
    the oldest beyond that), every file is written before ``predict`` returns, and an error in a
    writer thread is raised in the main process as a ``PredictionWriteError`` naming the file.
    The files are byte for byte those of ``workers=0`` (everything on the main process). Nothing
    is kept once written: call ``Trainer.predict(..., return_predictions=False)`` (the CLI does),
    else Lightning keeps every batch's prediction in memory as well.

    Args:
        output_dir: where to write; default ``<run directory>/predictions``.
        overlay_alpha: weight of the colour mask in the overlay, in [0, 1].
        workers: writer threads; 0 writes on the main process, between batches.
        max_pending: the most segmentation images queued or being written at once (>= 1).

    Example:
        >>> PredictionWriter(overlay_alpha=0.4).overlay_alpha
        0.4
    """

    def __init__(
        self,
        output_dir: str | None = None,
        overlay_alpha: float = 0.5,
        workers: int = 2,
        max_pending: int = 4,
    ):
        super().__init__(write_interval="batch")
        if not 0.0 <= overlay_alpha <= 1.0:
            raise ConfigError(f"overlay_alpha must be in [0, 1], got {overlay_alpha}")
        if workers < 0:
            raise ConfigError(f"workers must be 0 (write on the main process) or more: {workers}")
        if max_pending < 1:
            raise ConfigError(f"max_pending must be at least 1, got {max_pending}")
        self.output_dir = output_dir
        self.overlay_alpha = overlay_alpha
        self.workers = workers
        self.max_pending = max_pending
        self._pool: _WritePool | None = None
        self.peak_pending = 0  # the most images queued or being written at once, last predict
        self._reset()

    def _reset(self) -> None:
        self.folder: str | None = None
        self.images_written = 0
        self._kinds: dict[str, None] = {}  # ordered set of what was written, for the report
        self._tables: dict[int, _SegmentationTables] = {}
        self._seen: dict[int, int] = {}  # per dataloader, for loaders without batch indices
        self._csv_files: dict[int, tuple[Any, Any, str, str]] = {}
        self._close_pool()
        self.peak_pending = 0

    def _writes(self) -> _WritePool:
        if self._pool is None:  # made in the process that predicts (a spawned DDP rank too)
            self._pool = _WritePool(self.workers, self.max_pending)
        return self._pool

    def _close_pool(self, finish: bool = False) -> None:
        """Wait for every write (``finish``: raising the first failure) or, after an error, only
        for the running ones."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            pool.finish() if finish else pool.close()
        finally:
            self.peak_pending = max(self.peak_pending, pool.peak_pending)

    # ---- Lightning hooks ------------------------------------------------------------------------

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.folder = self.output_dir or os.path.join(run_directory(trainer), "predictions")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        predicted, confidence, label = _unpack(prediction)
        predicted = predicted.cpu()  # confidence and label: only for the CSV
        indices = self._dataset_indices(batch_indices, len(predicted), dataloader_idx)
        folder = self._loader_folder(trainer, dataloader_idx)
        view = _DatasetView(_prediction_dataset(trainer, dataloader_idx))
        if predicted.ndim == 1:
            confidence, label = _cpu(confidence), _cpu(label)
            self._write_rows(trainer, folder, dataloader_idx, indices, predicted, confidence, label)
        elif predicted.ndim == 3:
            tables = self._segmentation_tables(view, pl_module, dataloader_idx)
            inputs = batch if isinstance(batch, Tensor) else batch[0]
            for row, index in enumerate(indices):
                self._write_masks(view, tables, folder, index, predicted[row], inputs[row])
        else:
            raise ConfigError(
                f"prediction of shape {tuple(predicted.shape)} is neither (N,) class ids nor "
                "(N, H, W) trainIds"
            )
        self.images_written += len(indices)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_pool(finish=True)
        self._close_csv_files(keep=True)
        count = torch.tensor(float(self.images_written), device=pl_module.device)
        total = int(trainer.strategy.reduce(count, reduce_op="sum").item())  # every rank calls it
        if trainer.is_global_zero:
            kinds = f" ({', '.join(self._kinds)})" if self._kinds else ""
            print(f"Predictions: {total} images -> {self.folder}{kinds}", flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._close_pool()
        self._close_csv_files(keep=False)

    # ---- where things go ------------------------------------------------------------------------

    def _dataset_indices(
        self, batch_indices: Sequence[int] | None, size: int, dataloader_idx: int
    ) -> list[int]:
        """Dataset indices of this batch; a running count when the loader cannot tell (an
        iterable dataset: names then depend on the order, and DDP ranks would collide)."""
        seen = self._seen.get(dataloader_idx, 0)
        self._seen[dataloader_idx] = seen + size
        if batch_indices:
            if len(batch_indices) != size:
                raise ConfigError(f"{size} predictions for a batch of {len(batch_indices)} items")
            return [int(i) for i in batch_indices]
        return list(range(seen, seen + size))

    def _loader_folder(self, trainer: L.Trainer, dataloader_idx: int) -> str:
        if _number_of_loaders(trainer) > 1:
            return os.path.join(self.folder, f"dataloader_{dataloader_idx}")
        return self.folder

    def _segmentation_tables(self, view, pl_module, dataloader_idx: int) -> _SegmentationTables:
        if dataloader_idx not in self._tables:
            module_classes = (
                pl_module.task.num_classes if isinstance(pl_module, EvaluatingModule) else None
            )
            self._tables[dataloader_idx] = _SegmentationTables(view, module_classes)
        return self._tables[dataloader_idx]

    # ---- segmentation ---------------------------------------------------------------------------

    def _write_masks(
        self,
        view: _DatasetView,
        tables: _SegmentationTables,
        folder: str,
        index: int,
        ids: Tensor,
        network_input: Tensor,
    ) -> None:
        """Check the ids and ask the dataset for the name and image here (the main process);
        convert and write in a writer thread, from a uint8 copy of the ids. The overlay is
        drawn on the image file where the dataset names one (``image_path``), else on the
        network's input as it saw it (a generated scene), stretched to 0..255."""
        name = view.item_name(index)
        tables.check(ids, name)
        image = view.call("image_path", index)
        if image is None and network_input.ndim == 3 and network_input.shape[0] in (1, 3):
            image = _displayable(network_input)
        kinds = (tables.folder, "colour") + (("overlay",) if image is not None else ())
        for kind in kinds:
            self._kinds[f"{kind}/"] = None
        train_ids = ids.to(torch.uint8).numpy()

        def job() -> None:
            self._write_image(tables, folder, name, train_ids, image)

        self._writes().submit(job)

    def _write_image(
        self,
        tables: _SegmentationTables,
        folder: str,
        name: str,
        train_ids: np.ndarray,
        image_source: Any,
    ) -> None:
        """The id (labelId or trainId), colour and overlay PNGs of one image; the overlay's
        image is a file (``image_source`` a path) or (H, W, 3) uint8 pixels."""
        from_file = image_source is not None and not isinstance(image_source, np.ndarray)
        image_path = image_source if from_file else "the network input"
        doing = ("read", image_path) if image_source is not None else None
        try:
            with contextlib.ExitStack() as stack:
                image = stack.enter_context(Image.open(image_source)) if from_file else None
                if isinstance(image_source, np.ndarray):
                    image = Image.fromarray(image_source)
                mask = Image.fromarray(train_ids)
                if image is not None and image.size != mask.size:  # the header gives the size
                    mask = mask.resize(image.size, Image.Resampling.NEAREST)
                train_ids = np.asarray(mask)
                written = tables.ids[train_ids] if tables.ids is not None else train_ids
                doing = ("write", self._path(folder, tables.folder, name))
                save_png_atomically(Image.fromarray(written), doing[1])
                colours = tables.colours[train_ids]
                doing = ("write", self._path(folder, "colour", name))
                save_png_atomically(Image.fromarray(colours), doing[1])
                if image is not None:
                    doing = ("read", image_path)
                    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
                    doing = ("write", self._path(folder, "overlay", name))
                    overlay = self._overlay(pixels, colours, train_ids)
                    save_png_atomically(Image.fromarray(overlay), doing[1])
        except Exception as err:
            what, path = doing or ("write", self._path(folder, tables.folder, name))
            raise PredictionWriteError(
                f"PredictionWriter could not {what} {path} (prediction for {name!r}): "
                f"{type(err).__name__}: {err}"
            ) from err

    def _overlay(self, image: np.ndarray, colours: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
        """The image with the colours blended in at ``overlay_alpha`` (in float64, rounded half
        to even), except on ignored pixels, which keep the image's."""
        blended = image * (1.0 - self.overlay_alpha)
        blended += colours * self.overlay_alpha
        overlay = np.rint(blended, out=blended).astype(np.uint8)
        ignored = train_ids == IGNORE_INDEX
        overlay[ignored] = image[ignored]
        return overlay

    @staticmethod
    def _path(folder: str, kind: str, name: str) -> str:
        return os.path.join(folder, kind, f"{name}.png")

    # ---- classification -------------------------------------------------------------------------

    def _write_rows(self, trainer, folder, dataloader_idx, indices, predicted, confidence, label):
        writer = self._csv_writer(trainer, folder, dataloader_idx)
        for row, index in enumerate(indices):
            writer.writerow(
                [
                    index,
                    int(predicted[row]),
                    "" if confidence is None else f"{float(confidence[row]):.6f}",
                    "" if label is None else int(label[row]),
                ]
            )

    def _csv_writer(self, trainer: L.Trainer, folder: str, dataloader_idx: int):
        if dataloader_idx not in self._csv_files:
            name = "predictions.csv"
            if trainer.world_size > 1:
                name = f"predictions-rank{trainer.global_rank}.csv"
            path = os.path.join(folder, name)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
            file = open(tmp, "w", newline="")  # noqa: SIM115 (closed in on_predict_end)
            writer = csv.writer(file)
            writer.writerow(CSV_COLUMNS)
            self._csv_files[dataloader_idx] = (file, writer, tmp, path)
            self._kinds["predictions-rank*.csv" if trainer.world_size > 1 else name] = None
        return self._csv_files[dataloader_idx][1]

    def _close_csv_files(self, keep: bool) -> None:
        """Close the CSVs and rename them into place (``keep``) or delete them (after a crash)."""
        for file, _, tmp, path in self._csv_files.values():
            file.close()
            if keep:
                os.replace(tmp, path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self._csv_files = {}
