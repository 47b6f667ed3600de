"""RandomPart (the paper's "supervised on target" halves) and the summary of a SourceModule fit."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from dam_lightning.callbacks import AdaptationSummary
from dam_lightning.data import RandomPart, UCIDigits, dataset_info
from dam_lightning.data.datamodule import DomainAdaptationDataModule
from dam_lightning.errors import DataError
from dam_lightning.models import LeNet
from dam_lightning.modules import SourceModule

from .conftest import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _numbers(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32), torch.arange(n) % 10)


def test_the_two_parts_of_one_seed_are_disjoint_and_hold_every_item_once():
    base = _numbers(101)
    train = RandomPart(base, "train", fraction=0.5, seed=3)
    held_out = RandomPart(base, "held_out", fraction=0.5, seed=3)
    assert (len(train), len(held_out)) == (50, 51)  # round(50.5) == 50
    assert not set(train.indices) & set(held_out.indices)
    assert sorted(train.indices + held_out.indices) == list(range(101))
    assert [int(train[i][0]) for i in range(len(train))] == train.indices  # items unchanged


def test_the_split_depends_on_its_seed_only():
    base = _numbers(60)
    first = RandomPart(base, "train", seed=1).indices
    torch.manual_seed(12345)  # the global RNG must not matter
    assert RandomPart(base, "train", seed=1).indices == first
    assert RandomPart(base, "train", seed=2).indices != first
    assert first != list(range(30))  # a random half, not the first one


def test_the_wrapped_sets_info_passes_through():
    part = RandomPart(UCIDigits(), "held_out", fraction=0.25, seed=0)
    assert dataset_info(part).num_classes == part.num_classes == 10
    assert len(part) == len(UCIDigits()) - round(0.25 * len(UCIDigits()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"part": "test"}, "part must be 'train' or 'held_out', got 'test'"),
        ({"fraction": 1.0}, "fraction must be strictly between 0 and 1"),
        ({"fraction": 0.01}, "leaves the train part empty"),
        ({"fraction": 0.99}, "leaves the held_out part empty"),
    ],
)
def test_a_part_that_cannot_be_drawn_is_refused_with_the_value(kwargs, message):
    with pytest.raises(DataError, match=message):
        RandomPart(_numbers(10), **kwargs)


def test_a_source_module_fit_writes_one_summary_row_named_by_the_callback(tmp_path):
    torch.manual_seed(0)
    digits = UCIDigits()
    train, held_out = (RandomPart(digits, part, seed=0) for part in ("train", "held_out"))
    module = SourceModule(LeNet, num_classes=10)
    data = DomainAdaptationDataModule(train, held_out, batch_size=32)
    summary = AdaptationSummary(final_label="supervised on target")
    trainer = quiet_trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[summary])
    trainer.fit(module, datamodule=data)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert list(rows) == ["supervised on target"]
    # the row is the trained network scored on the held-out half, nothing else
    expected = module.task.evaluate(
        module.eval_net, data.val_dataloader()[0], module.device, "held-out batch"
    )
    assert rows["supervised on target"]["acc"] == pytest.approx(expected["acc"])
    assert len(data.val_dataloader()[0].dataset) == len(held_out)


def test_a_fine_tune_scores_its_starting_network_before_the_first_step(tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "start.pt"
    torch.save(LeNet(10).state_dict(), init)
    digits = UCIDigits()
    train, held_out = (RandomPart(digits, part, seed=0) for part in ("train", "held_out"))
    module = SourceModule(LeNet, num_classes=10, init_weights=str(init))
    data = DomainAdaptationDataModule(train, held_out, batch_size=32)
    start = SourceModule(LeNet, num_classes=10)
    start.net.load_state_dict(torch.load(init))
    expected = start.task.evaluate(start.net, data.val_dataloader()[0], "cpu", "batch")
    summary = AdaptationSummary(final_label="after fine-tuning")
    trainer = quiet_trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[summary])
    trainer.fit(module, datamodule=data)
    assert list(summary.rows) == ["starting network", "after fine-tuning"]
    assert summary.rows["starting network"]["acc"] == pytest.approx(expected["acc"])
    assert summary.rows["after fine-tuning"]["acc"] != pytest.approx(expected["acc"])
