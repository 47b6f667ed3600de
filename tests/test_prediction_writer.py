"""PredictionWriter through a real ``Trainer.predict``: a fake module returning fixed predictions
in the ``predict_step`` contract; tiny datasets with and without names, images, palettes, ids."""

from __future__ import annotations

import copy
import functools
import gc
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dam_lightning.callbacks import PredictionWriter, predictions
from dam_lightning.callbacks.predictions import PredictionWriteError
from dam_lightning.cli import main
from dam_lightning.data.labels import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_INFO,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
)
from dam_lightning.trainer import DamTrainer

from .conftest import REPO
from .segmentation_fixtures import write_cityscapes, write_gta5

H, W = 8, 16  # prediction size


class FixedPredictions(L.LightningModule):
    """Returns ``table[index]`` for each item, in the contract
    ``{"prediction", "confidence", "label"}``; the batch is ``(image, index)``."""

    def __init__(self, table: torch.Tensor, labels: torch.Tensor | None = None):
        super().__init__()
        self.table, self.labels = table, labels

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        _, index = batch
        prediction = self.table[index]
        return {
            "prediction": prediction,
            "confidence": torch.full(prediction.shape, 0.75) - 0.25 * (prediction % 2),
            "label": None if self.labels is None else self.labels[index],
        }


class TinyCityscapes(Dataset):
    """Cityscapes-like items ``(image, index)`` with names in city folders and RGB images on disk
    of ``image_size`` (W, H)."""

    info = CITYSCAPES_INFO

    def __init__(self, root: Path, count: int, image_size: tuple[int, int] = (W, H)):
        self.root, self.count = root, count
        rng = np.random.default_rng(0)
        for index in range(count):
            path = self.image_path(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return torch.zeros(3, H, W), index

    def city(self, index: int) -> str:
        return "frankfurt" if index % 2 == 0 else "lindau"

    def item_name(self, index: int) -> str:
        return f"{self.city(index)}/{self.city(index)}_000000_{index:06d}"

    def image_path(self, index: int) -> Path:
        name = f"{self.item_name(index)}_leftImg8bit.png"
        return self.root / "leftImg8bit" / "test" / name


def seg_table(count: int) -> torch.Tensor:
    """Per item a distinct (H, W) trainId map covering all 19 classes and an ignored pixel."""
    base = torch.arange(H * W).reshape(H, W) % 19
    table = torch.stack([(base + 3 * i) % 19 for i in range(count)])
    table[:, 0, 0] = IGNORE_INDEX
    return table


def predict(
    module, dataset, writer, batch_size: int = 2, spy=None, keep: bool | None = False, **kwargs
):
    """``Trainer.predict`` with ``writer`` (and ``spy``), keeping the predictions if ``keep``
    (None: Lightning's default, keep them)."""
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer] + ([spy] if spy else []),
        **kwargs,
    )
    loader = DataLoader(dataset, batch_size=batch_size)
    return trainer.predict(module, loader, return_predictions=keep)


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def hidden_files(folder: Path) -> list[Path]:
    return list(folder.rglob(".*"))


def test_segmentation_writes_label_ids_colours_and_overlays(tmp_path, capsys):
    dataset = TinyCityscapes(tmp_path / "data", count=4)
    subset = Subset(dataset, [3, 1, 2])  # names must follow the dataset's own indices
    table = seg_table(4)
    out = tmp_path / "out"
    predict(FixedPredictions(table), subset, PredictionWriter(str(out), overlay_alpha=0.5))

    for index in (3, 1, 2):
        name = dataset.item_name(index)
        with Image.open(out / "labelIds" / f"{name}.png") as png:
            assert png.mode == "L" and png.size == (W, H)
            label_ids = torch.from_numpy(np.array(png)).long()
        assert torch.equal(CITYSCAPES_ID_TO_TRAIN_ID[label_ids], table[index]), name
        assert label_ids[0, 0] == 0  # ignored -> void

        colour = read(out / "colour" / f"{name}.png")
        expected = np.array(CITYSCAPES_PALETTE + ((0, 0, 0),) * 237, dtype=np.uint8)
        assert np.array_equal(colour, expected[table[index].numpy()])

        overlay = read(out / "overlay" / f"{name}.png").astype(int)
        image = read(dataset.image_path(index)).astype(int)
        assert overlay.shape == (H, W, 3)
        assert np.array_equal(overlay[0, 0], image[0, 0])  # ignored pixel: the image only
        blended = np.rint(0.5 * image[1:] + 0.5 * colour[1:].astype(int))
        assert np.abs(overlay[1:] - blended).max() <= 1

    assert not (out / "labelIds" / f"{dataset.item_name(0)}.png").exists()  # not in the subset
    assert not (out / "trainIds").exists() and not hidden_files(out)
    printed = capsys.readouterr().out
    assert f"Predictions: 3 images -> {out} (labelIds/, colour/, overlay/)" in printed


def test_predictions_are_resized_to_the_native_image_size_with_nearest(tmp_path):
    dataset = TinyCityscapes(tmp_path / "data", count=1, image_size=(2 * W, 2 * H))
    table = seg_table(1)
    predict(FixedPredictions(table), dataset, PredictionWriter(str(tmp_path / "out")))

    name = dataset.item_name(0)
    label_ids = torch.from_numpy(read(tmp_path / "out" / "labelIds" / f"{name}.png")).long()
    upsampled = table[0].repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)
    assert torch.equal(CITYSCAPES_ID_TO_TRAIN_ID[label_ids], upsampled)
    assert read(tmp_path / "out" / "colour" / f"{name}.png").shape == (2 * H, 2 * W, 3)
    assert read(tmp_path / "out" / "overlay" / f"{name}.png").shape == (2 * H, 2 * W, 3)


def test_plain_dataset_gets_train_ids_default_names_and_the_run_folder(tmp_path, capsys):
    table = seg_table(3)
    dataset = TensorDataset(torch.zeros(3, 3, H, W), torch.arange(3))
    predict(FixedPredictions(table), dataset, PredictionWriter(), default_root_dir=str(tmp_path))

    out = tmp_path / "predictions"
    assert sorted(p.name for p in (out / "trainIds").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
    assert np.array_equal(read(out / "trainIds" / "000002.png"), table[2].numpy())
    assert tuple(read(out / "colour" / "000002.png")[0, 1]) == CITYSCAPES_PALETTE[table[2, 0, 1]]
    assert not (out / "labelIds").exists()
    kinds = "(trainIds/, colour/, overlay/)"  # no image file: drawn on the network input
    assert f"Predictions: 3 images -> {out} {kinds}" in capsys.readouterr().out


def test_without_an_image_file_the_overlay_is_drawn_on_the_network_input(tmp_path):
    table = seg_table(2)
    inputs = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    dataset = TensorDataset(inputs, torch.arange(2))
    predict(FixedPredictions(table), dataset, PredictionWriter(str(tmp_path), overlay_alpha=0.5))
    x = inputs[1]
    stretched = ((x - x.min()) / (x.max() - x.min()) * 255).round().permute(1, 2, 0).numpy()
    colour = read(tmp_path / "colour" / "000001.png").astype(float)
    overlay = read(tmp_path / "overlay" / "000001.png").astype(float)
    assert np.array_equal(overlay[0, 0], stretched[0, 0])  # ignored pixel: the input only
    assert np.abs(overlay[1:] - (0.5 * stretched[1:] + 0.5 * colour[1:])).max() <= 0.5


@pytest.mark.parametrize("alpha", [0.5, 0.3, 1.0])
def test_the_overlay_has_the_pixels_of_the_previous_float_blend(alpha):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    colours = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    train_ids = rng.choice([0, 5, IGNORE_INDEX], (32, 64)).astype(np.uint8)
    weight = np.where(train_ids == IGNORE_INDEX, 0.0, alpha)[..., None]  # as written before
    before = np.rint(image.astype(np.float32) * (1 - weight) + colours.astype(np.float32) * weight)
    after = PredictionWriter(overlay_alpha=alpha)._overlay(image, colours, train_ids)
    assert np.array_equal(after, before.astype(np.uint8))


@pytest.mark.parametrize("with_labels", [True, False])
def test_classification_writes_one_csv_in_batch_order(tmp_path, capsys, with_labels):
    table = torch.tensor([4, 7, 1, 0, 9])
    labels = torch.tensor([4, 2, 1, 0, 9]) if with_labels else None
    dataset = TensorDataset(torch.zeros(5, 1, 4, 4), torch.arange(5))
    out = tmp_path / "out"
    predict(FixedPredictions(table, labels), dataset, PredictionWriter(str(out)), batch_size=2)

    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "index,prediction,confidence,label"
    expected_label = ["4", "2", "1", "0", "9"] if with_labels else [""] * 5
    confidence = ["0.750000", "0.500000", "0.500000", "0.750000", "0.500000"]
    assert lines[1:] == [
        f"{i},{int(table[i])},{confidence[i]},{expected_label[i]}" for i in range(5)
    ]
    assert not hidden_files(out)
    assert f"Predictions: 5 images -> {out} (predictions.csv)" in capsys.readouterr().out


def test_ids_without_a_colour_are_refused(tmp_path):
    table = torch.full((1, H, W), 23)  # a 24th class with the 19-colour Cityscapes palette
    dataset = TensorDataset(torch.zeros(1, 3, H, W), torch.arange(1))
    with pytest.raises(ValueError, match="trainId 23, outside 0..18"):
        predict(FixedPredictions(table), dataset, PredictionWriter(str(tmp_path / "out")))
    assert not hidden_files(tmp_path)


def test_cityscapes_file_matching_finds_one_label_id_file_per_image(tmp_path):
    cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    dataset = TinyCityscapes(tmp_path / "data", count=2)
    out = tmp_path / "out"
    predict(FixedPredictions(seg_table(2)), dataset, PredictionWriter(str(out)))

    args = copy.copy(cs_eval.args)
    args.predictionPath, args.predictionWalk = str(out / "labelIds"), None
    for index in range(2):
        ground_truth = f"/gtFine/test/{dataset.item_name(index)}_gtFine_labelIds.png"
        found = cs_eval.getPrediction(args, ground_truth)
        assert Path(found) == out / "labelIds" / f"{dataset.item_name(index)}.png"


def test_under_ddp_each_rank_writes_its_own_csv_and_only_rank_zero_prints(tmp_path, capsys):
    dataset = TensorDataset(torch.zeros(4, 1, 4, 4), torch.arange(4))
    trainer = SimpleNamespace(  # what the writer reads from a rank-1 trainer of a 2-process run
        world_size=2,
        global_rank=1,
        is_global_zero=False,
        predict_dataloaders=[DataLoader(dataset)],
        strategy=SimpleNamespace(reduce=lambda count, reduce_op: 2 * count),
    )
    module = FixedPredictions(torch.tensor([3, 1, 4, 1]))
    writer = PredictionWriter(str(tmp_path))
    writer.on_predict_start(trainer, module)
    batch = (torch.zeros(2, 1, 4, 4), torch.tensor([1, 3]))
    outputs = module.predict_step(batch, 0)
    writer.write_on_batch_end(trainer, module, outputs, [1, 3], batch, 0, 0)
    writer.on_predict_end(trainer, module)

    lines = (tmp_path / "predictions-rank1.csv").read_text().splitlines()
    assert lines == ["index,prediction,confidence,label", "1,1,0.500000,", "3,1,0.500000,"]
    assert not (tmp_path / "predictions.csv").exists()
    assert capsys.readouterr().out == ""


# ---- writing in threads, bounded, keeping nothing (issue 18, item 4) ----------------------------


class KeptOutputs(L.Callback):
    """Weak references to every batch's prediction tensor: after ``predict`` the live ones are
    what something (Lightning's ``return_predictions``, the writer's queue) still holds."""

    def __init__(self):
        self.refs: list[weakref.ref] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.refs.append(weakref.ref(outputs["prediction"]))

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.refs)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def slow_saves(monkeypatch, delay: float = 0.005, fail: str | None = None) -> list[str]:
    """Every PNG save sleeps ``delay`` first (so writes lag inference) and records the thread that
    made it; a save to a path containing ``fail`` raises ``OSError`` instead."""
    threads: list[str] = []
    save = predictions.save_png_atomically

    def spy(image, path):
        threads.append(threading.current_thread().name)
        time.sleep(delay)
        if fail is not None and fail in str(path):
            raise OSError(28, "No space left on device")
        save(image, path)

    monkeypatch.setattr(predictions, "save_png_atomically", spy)
    return threads


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("PredictionWriter")]


def test_threaded_files_are_byte_identical_to_the_serial_ones(tmp_path):
    dataset = TinyCityscapes(tmp_path / "data", count=12, image_size=(2 * W, 2 * H))
    subset = Subset(dataset, [5, 0, 11, 3, 7, 2, 9, 1, 10, 4, 8, 6])
    table = seg_table(12)
    folders = {}
    for workers, max_pending in [(0, 1), (1, 1), (2, 4), (4, 3)]:
        out = tmp_path / f"out-{workers}-{max_pending}"
        writer = PredictionWriter(str(out), workers=workers, max_pending=max_pending)
        predict(FixedPredictions(table), subset, writer, batch_size=5)
        folders[workers, max_pending] = files_of(out)
        assert writer.peak_pending <= max_pending
    serial = folders.pop((0, 1))
    assert len(serial) == 3 * 12
    for key, files in folders.items():
        assert files == serial, key  # same names, same bytes
    assert not writer_threads()


@pytest.mark.parametrize("count", [4, 16])
def test_writing_overlaps_predicting_through_a_bounded_queue(tmp_path, monkeypatch, count):
    threads = slow_saves(monkeypatch)
    dataset = TinyCityscapes(tmp_path / "data", count=count)
    writer = PredictionWriter(str(tmp_path / "out"), workers=2, max_pending=3)
    kept = KeptOutputs()
    result = predict(FixedPredictions(seg_table(count)), dataset, writer, spy=kept)

    assert result is None and kept.alive() == 0  # nothing kept, whatever the count
    assert writer.peak_pending == min(3, count)  # the queue fills up to its bound, never more
    assert len(threads) == 3 * count and "MainThread" not in threads
    for index in range(count):  # every file is there when predict returns
        for kind in ("labelIds", "colour", "overlay"):
            assert (tmp_path / "out" / kind / f"{dataset.item_name(index)}.png").is_file()
    assert not hidden_files(tmp_path / "out") and not writer_threads()


def test_returned_predictions_are_what_the_kept_outputs_count_sees(tmp_path):
    """The control for ``KeptOutputs``: with Lightning's default every batch stays alive."""
    dataset = TensorDataset(torch.zeros(4, 3, H, W), torch.arange(4))
    kept = KeptOutputs()
    writer = PredictionWriter(str(tmp_path / "out"))
    result = predict(FixedPredictions(seg_table(4)), dataset, writer, spy=kept, keep=None)
    assert len(result) == 2 and kept.alive() == 2


def test_an_error_in_a_writer_thread_names_the_file_and_stops_predict(tmp_path, monkeypatch):
    dataset = TinyCityscapes(tmp_path / "data", count=8)
    failing = dataset.item_name(3)
    slow_saves(monkeypatch, fail=f"colour/{failing}")
    out = tmp_path / "out"
    writer = PredictionWriter(str(out), workers=2, max_pending=2)
    with pytest.raises(PredictionWriteError) as raised:
        predict(FixedPredictions(seg_table(8)), dataset, writer, batch_size=2)
    message = str(raised.value)
    assert str(out / "colour" / f"{failing}.png") in message and "No space left" in message
    assert isinstance(raised.value.__cause__, OSError)
    assert not (out / "colour" / f"{failing}.png").exists()
    assert not hidden_files(out) and not writer_threads()  # no thread writes after predict


def test_workers_and_max_pending_are_checked():
    with pytest.raises(ValueError, match="workers must be 0"):
        PredictionWriter(workers=-1)
    with pytest.raises(ValueError, match="max_pending must be at least 1"):
        PredictionWriter(max_pending=0)


@pytest.mark.slow
def test_cli_predict_keeps_nothing_for_4_or_16_images(tmp_path, monkeypatch):
    """``python -m dam_lightning predict`` on 4 and on 16 Cityscapes-format images: Lightning is
    told not to keep predictions, none is alive after the run, and the queue stays in bound."""
    calls = []
    original = DamTrainer.predict

    @functools.wraps(original)  # LightningCLI reads predict's arguments from its signature
    def spy(self, *args, **kwargs):
        kept = KeptOutputs()
        self.callbacks.append(kept)
        result = original(self, *args, **kwargs)
        writer = next(cb for cb in self.callbacks if isinstance(cb, PredictionWriter))
        calls.append((kwargs.get("return_predictions"), result, kept, writer))
        return result

    monkeypatch.setattr(DamTrainer, "predict", spy)
    monkeypatch.chdir(tmp_path)
    write_gta5(tmp_path / "gta5", n=2)
    for count in (4, 16):
        root = tmp_path / f"cityscapes-{count}"
        write_cityscapes(root, "train", per_city=1)
        write_cityscapes(root, "val", per_city=count // 2, size=(64, 128))
        main(["predict", "--config", str(REPO / "configs" / "gta_source.yaml"),
              "--config", str(REPO / "tests" / "conf" / "seg_tiny.yaml"),
              f"--data.source.init_args.root={tmp_path / 'gta5'}",
              f"--data.target.init_args.root={root}", f"--data.target_val.init_args.root={root}",
              f"--trainer.callbacks+={PredictionWriter.__module__}.PredictionWriter",
              "--trainer.callbacks.init_args.output_dir", str(tmp_path / f"out-{count}"),
              "--trainer.callbacks.init_args.max_pending", "2"])  # fmt: skip
        assert len(list((tmp_path / f"out-{count}" / "labelIds").rglob("*.png"))) == count

    for return_predictions, result, kept, writer in calls:
        assert return_predictions is False and result is None
        assert kept.alive() == 0 and writer.peak_pending <= 2
    assert [len(kept.refs) for _, _, kept, _ in calls] == [2, 8]  # batches of 2 images
