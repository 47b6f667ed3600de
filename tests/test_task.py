"""The classification task's metrics against a confusion matrix built by hand."""

from __future__ import annotations

import pytest
import torch

from dam_lightning.callbacks.summary import format_table
from dam_lightning.modules.task import ClassificationTask


def _hand_built_confusion(predicted: torch.Tensor, labels: torch.Tensor, n: int) -> list:
    confusion = [[0] * n for _ in range(n)]
    for p, y in zip(predicted.tolist(), labels.tolist(), strict=True):
        confusion[y][p] += 1
    return confusion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_worst_class_accuracy_equal_the_hand_built_confusion_matrix(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 5
    labels = torch.randint(0, n - 1, (300,), generator=generator)  # class 4 never occurs
    logits = torch.randn(300, n, generator=generator)
    logits[torch.arange(300), labels] += torch.rand(300, generator=generator) * 2  # some right
    metrics = ClassificationTask(n).metrics()
    for chunk in range(0, 300, 64):  # in batches, as in validation
        metrics.update(logits[chunk : chunk + 64], labels[chunk : chunk + 64])
    result = {k: v.item() for k, v in metrics.compute().items()}

    confusion = _hand_built_confusion(logits.argmax(1), labels, n)
    correct = sum(confusion[c][c] for c in range(n))
    per_class = [confusion[c][c] / sum(confusion[c]) for c in range(n) if sum(confusion[c])]
    assert result["acc"] == pytest.approx(correct / 300)
    assert result["worst_class_acc"] == pytest.approx(min(per_class))  # absent class 4 ignored
    assert result["worst_class_acc"] < result["acc"]


def test_worst_class_accuracy_shows_one_class_mapped_onto_another():
    """90% overall, yet every 7 is called a 9: the worst class is at 0%."""
    labels = torch.arange(100) % 10
    predicted = torch.where(labels == 7, torch.tensor(9), labels)
    metrics = ClassificationTask(10).metrics()
    metrics.update(torch.nn.functional.one_hot(predicted, 10).float(), labels)
    result = metrics.compute()
    assert result["acc"].item() == pytest.approx(0.9)
    assert result["worst_class_acc"].item() == 0.0


def test_summary_table_columns_line_up_for_long_metric_names():
    table = format_table(
        {"source only": {"acc": 0.5, "worst_class_acc": 0.25}, "after GAM": {"acc": 0.9}}, "T"
    )
    lines = table.splitlines()[2:]
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header
    assert lines[2].split("|")[2:4] == ["  50.00 ", "           25.00 "]
    assert lines[3].rstrip("|").endswith("- ")
