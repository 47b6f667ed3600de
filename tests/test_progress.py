"""Progress on screen: the training bar counts the whole run; Gaussian matching, the source
statistics and the summary's scorings each show a bar of their own (rank 0, only when the
trainer shows bars) and log their duration."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dam_lightning.callbacks import AdaptationSummary, GaussianMatching, RunProgress, RunProgressBar
from dam_lightning.callbacks.progress import Phase
from dam_lightning.data.datamodule import DomainAdaptationDataModule
from dam_lightning.matching import gaussian_match
from dam_lightning.matching.engine import reporting_matched_layers
from dam_lightning.modules import GAMAdaptModule

from .conftest import quiet_trainer
from .toy_segmentation import CLASSES, Scenes, TinySegNet

pytestmark = pytest.mark.usefixtures("one_thread")


class BarSpy(RunProgress):
    """RunProgress that also notes the training bar's count and total before every batch."""

    def __init__(self):
        self.seen: list[tuple[int, int | None, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total, bar.unit))


def _fit_boring(tmp_path, **budget) -> tuple[BarSpy, object]:
    spy = BarSpy()
    trainer = quiet_trainer(enable_progress_bar=True, limit_train_batches=4,
                            default_root_dir=tmp_path, callbacks=[spy], **budget)  # fmt: skip
    trainer.fit(BoringModel())
    return spy, trainer


def test_the_training_bar_counts_max_steps_across_epochs(tmp_path, capsys):
    spy, trainer = _fit_boring(tmp_path, max_steps=10, max_epochs=-1)
    assert type(trainer.progress_bar_callback) is RunProgressBar
    # before batch k the bar shows the k steps done, of the run's 10 (not of an epoch's 4)
    assert spy.seen == [(k, 10, "steps") for k in range(10)]
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.n, bar.total) == (10, 10)
    assert "10/10 steps" in capsys.readouterr().out


def test_the_training_bar_counts_the_batches_of_max_epochs(tmp_path):
    spy, trainer = _fit_boring(tmp_path, max_epochs=3)
    assert spy.seen == [(k, 12, "batches") for k in range(12)]  # 3 epochs of 4 batches


def test_run_progress_leaves_a_run_without_bars_alone():
    trainer = quiet_trainer(enable_progress_bar=False, callbacks=[RunProgress()], max_steps=1)
    RunProgress().setup(trainer, None, "fit")
    assert trainer.progress_bar_callback is None
    custom = TQDMProgressBar(refresh_rate=5)
    trainer = quiet_trainer(enable_progress_bar=True, callbacks=[RunProgress(), custom])
    RunProgress().setup(trainer, None, "fit")
    assert type(trainer.progress_bar_callback) is RunProgressBar  # a stock bar is replaced,
    assert trainer.progress_bar_callback.refresh_rate == 5  # with its settings


class SaysSomething(RunProgress):
    """RunProgress that logs a line, as a stage's end does, in the middle of training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == 5:
            rank_zero_info("a message in the middle of training")


def test_a_message_during_training_gets_a_line_of_its_own(tmp_path, capsys, caplog):
    logger = logging.getLogger("lightning.pytorch")
    console = logging.StreamHandler(sys.stdout)  # the bars' stream: the order can be read
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    logger.addHandler(console)
    try:
        trainer = quiet_trainer(enable_progress_bar=True, limit_train_batches=4, max_steps=10,
                                default_root_dir=tmp_path, callbacks=[SaysSomething()])  # fmt: skip
        trainer.fit(BoringModel())
    finally:
        logger.removeHandler(console)
    before, message, _ = capsys.readouterr().out.partition("a message in the middle of training")
    assert message and before.endswith("\r")  # the bar's line cleared first, not glued onto
    assert "5/10 steps" in before.rsplit("\n", 1)[-1]  # the bar it cleared
    assert console not in logger.handlers and not any(  # unwrapped after training
        type(handler).__name__ == "_AboveBars" for handler in logger.handlers
    )


@pytest.mark.parametrize("mode", ["one_pass", "layerwise"])
def test_both_engines_report_each_layer_once_in_network_order(mode):
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(2)]
    batches = [torch.randn(8, 3) for _ in range(3)]
    done: list[str] = []
    with reporting_matched_layers(done.append):
        report = gaussian_match(*nets, batches, batches, mode=mode)
    assert done == list(report.layers) == ["0", "2"]


def _trainer(shows_bar: bool, rank_zero: bool = True):
    bar = TQDMProgressBar() if shows_bar else None
    return SimpleNamespace(is_global_zero=rank_zero, progress_bar_callback=bar)


def test_a_phase_shows_a_bar_only_on_rank_zero_of_a_trainer_with_bars(caplog):
    caplog.set_level(logging.INFO, logger="dam_lightning")
    with Phase(_trainer(shows_bar=True), "Gaussian matching", 3, "layers") as phase:
        assert phase.bar is not None and phase.bar.total == 3 and phase.bar.pos != 0
        assert phase.bar.desc.startswith("Gaussian matching")
        for _ in range(3):
            phase.advance()
        assert phase.bar.n == 3
    assert phase.seconds > 0
    assert "Gaussian matching: 3 layers in " in caplog.text
    caplog.clear()
    for trainer in (_trainer(shows_bar=False), _trainer(shows_bar=True, rank_zero=False)):
        with Phase(trainer, "Scoring", 2, "batches") as phase:
            assert phase.bar is None
            list(phase.track([1, 2]))
        assert phase.count == 2
    assert "Scoring: 2 batches" in caplog.text and caplog.text.count("Scoring") == 1  # rank 0


def _gam_fit(tmp_path, enable_progress_bar: bool):
    module = GAMAdaptModule(
        TinySegNet, num_classes=3, task="segmentation", class_names=CLASSES,
        layers={"conv": 1.0}, gan_loss="lsgan", discriminator_width=8, source_steps=2,
    )  # fmt: skip
    data = DomainAdaptationDataModule(
        Scenes(8, 8), Scenes(8, 8, seed=1, shift=0.5), target_val=Scenes(6, 8, seed=2),
        batch_size=2, eval_batch_size=2,
    )  # fmt: skip
    trainer = quiet_trainer(
        max_steps=6, enable_progress_bar=enable_progress_bar, default_root_dir=tmp_path,
        callbacks=[RunProgress(), GaussianMatching(calibration_batches=2), AdaptationSummary()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)


def test_matching_and_scoring_show_named_bars_and_log_their_durations(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="dam_lightning")
    _gam_fit(tmp_path, enable_progress_bar=True)
    out = capsys.readouterr().out
    for bar in ("Source statistics", "Gaussian matching", "Scoring source only",
                "Scoring after Gaussian matching", "Scoring after GAM"):  # fmt: skip
        assert bar in out, bar
    assert "0/1 layers" in out and "0/3 batches" in out  # 6 target_val scenes, 2 a batch
    durations = ("Source statistics: 2 batches in ", "Gaussian matching: 1 layers in ",
                 "Scoring source only: 3 batches in ", "Scoring after GAM: 3 batches in ")
    for line in durations:
        assert line in caplog.text, line


def test_no_phase_bar_when_the_trainer_shows_no_bar(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="dam_lightning")
    _gam_fit(tmp_path, enable_progress_bar=False)
    captured = capsys.readouterr()
    assert "Scoring source only" not in captured.out + captured.err
    assert "Scoring source only: 3 batches in " in caplog.text  # the log still has it


@pytest.mark.slow
def test_the_segmentation_demo_shows_the_run_and_its_phases_and_logs_their_durations(
    tmp_path, monkeypatch, capsys
):
    from dam_lightning.cli import main

    from .test_seg_demo import CONFIG, TINY

    monkeypatch.chdir(tmp_path)
    with_bars = [arg for arg in TINY if arg != "--trainer.enable_progress_bar=false"]
    main(["fit", "--config", str(CONFIG), *with_bars])
    out = capsys.readouterr().out
    assert "Adaptation, epoch" in out and "/4 steps" in out  # --trainer.max_steps=4
    for bar in ("Source statistics", "Gaussian matching", "Scoring source only",
                "Scoring after Gaussian matching", "Scoring after GAM"):  # fmt: skip
        assert bar in out, bar
    [log] = list((tmp_path / "runs" / "seg_demo").rglob("log.txt"))
    text = log.read_text()
    durations = ("Gaussian matching: 113 layers in ",  # every foldable layer of ERFNet
                 "Source statistics: 4 batches in ",  # 16 scenes in batches of 4
                 "Scoring source only: 1 batches in ", "Scoring after GAM: 1 batches in ")
    for line in durations:
        assert line in text, line
