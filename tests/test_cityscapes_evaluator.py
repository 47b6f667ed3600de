"""SegmentationMetrics agrees with the Cityscapes authors' evaluator
(``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``) on a tiny Cityscapes-like tree:
labelId ground truth with void ids, labelId predictions found by the evaluator's own file matching,
a class absent from both (NaN in both) and a class only predicted (IoU 0 in both)."""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import math
from pathlib import Path

# The Cityscapes authors' evaluator is part of the test extra: a missing one is a failure, not a
# skip, so the agreement is proven on every CI run.
import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs_eval
import cityscapesscripts.helpers.labels as cs_labels
import numpy as np
import pytest
import torch
from PIL import Image

from dam_lightning.data.labels import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_PALETTE,
    TRAIN_ID_TO_CITYSCAPES_ID,
)
from dam_lightning.metrics import SegmentationMetrics

FRAMES = [("frankfurt", "000000", "000294"), ("frankfurt", "000001", "007973"),
          ("lindau", "000000", "000019")]  # fmt: skip
HEIGHT, WIDTH = 64, 128
ABSENT = CITYSCAPES_CLASSES.index("train")  # neither labelled nor predicted anywhere
ONLY_PREDICTED = CITYSCAPES_CLASSES.index("bus")
VOID_IDS = (0, 1, 4, 6, 9, 14, 29)  # unlabeled, ego vehicle, static, ground, parking, ...


def write_tree(root: Path) -> None:
    """gtFine/val/<city>/*_gtFine_labelIds.png and results/<city>/*.png labelId predictions,
    uint8 greyscale ("L") PNGs as the benchmark expects."""
    rng = np.random.default_rng(0)
    labelled = [t for t in range(19) if t not in (ABSENT, ONLY_PREDICTED)]
    predicted = [t for t in range(19) if t != ABSENT]
    for city, seq, frame in FRAMES:
        label_ids = np.array([CITYSCAPES_LABEL_IDS[t] for t in labelled] + list(VOID_IDS))
        gt = rng.choice(label_ids, size=(HEIGHT, WIDTH)).astype(np.uint8)
        gt[: HEIGHT // 4, : WIDTH // 2] = 7  # a large road block, mostly predicted right
        train_ids = CITYSCAPES_ID_TO_TRAIN_ID[torch.from_numpy(gt).long()].numpy()
        pred = np.where(train_ids == 255, rng.choice(predicted, size=gt.shape), train_ids)
        wrong = rng.random(gt.shape) < 0.3
        pred[wrong] = rng.choice(predicted, size=int(wrong.sum()))
        pred_label_ids = TRAIN_ID_TO_CITYSCAPES_ID[torch.from_numpy(pred)].numpy().astype(np.uint8)

        stem = f"{city}_{seq}_{frame}"
        (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        (root / "results" / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(gt).save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(pred_label_ids).save(root / "results" / city / f"{stem}.png")


def run_cityscapes_evaluator(root: Path) -> tuple[dict, list[str], list[str]]:
    """The evaluator's result dict, with its module-level arguments copied, not changed."""
    args = copy.copy(cs_eval.args)
    args.cityscapesPath = str(root)
    args.predictionPath = str(root / "results")
    args.predictionWalk = None
    args.exportFile = str(root / "evaluationResults" / "resultPixelLevelSemanticLabeling.json")
    args.evalInstLevelScore = False  # needs *_instanceIds.png, not part of IoU
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    ground_truth = sorted(glob.glob(str(root / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")))
    with contextlib.redirect_stdout(io.StringIO()):
        predictions = [cs_eval.getPrediction(args, gt) for gt in ground_truth]
        results = cs_eval.evaluateImgLists(predictions, ground_truth, args)
    return results, predictions, ground_truth


def read_train_ids(path: str) -> torch.Tensor:
    """A labelId PNG as a (1, H, W) trainId tensor."""
    label_ids = torch.from_numpy(np.array(Image.open(path))).long()
    return CITYSCAPES_ID_TO_TRAIN_ID[label_ids].unsqueeze(0)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    write_tree(root)
    results, predictions, ground_truth = run_cityscapes_evaluator(root)
    metric = SegmentationMetrics(CITYSCAPES_CLASSES)
    for pred, gt in zip(predictions, ground_truth, strict=True):
        metric.update(read_train_ids(pred), read_train_ids(gt))
    return results, metric, predictions


def test_evaluator_found_each_prediction_by_its_name(evaluated):
    _, _, predictions = evaluated
    assert [Path(p).name for p in predictions] == sorted(
        f"{city}_{seq}_{frame}.png" for city, seq, frame in FRAMES
    )


def test_per_class_iou_and_mean_agree_with_the_cityscapes_evaluator(evaluated):
    results, metric, _ = evaluated
    scores = {k: v.item() for k, v in metric.compute().items()}
    for train_id, name in enumerate(CITYSCAPES_CLASSES):
        theirs = results["classScores"][cs_labels.id2label[CITYSCAPES_LABEL_IDS[train_id]].name]
        ours = scores[f"iou/{name}"]
        assert (math.isnan(theirs) and math.isnan(ours)) or abs(theirs - ours) < 1e-6, name
    assert math.isnan(scores[f"iou/{CITYSCAPES_CLASSES[ABSENT]}"])
    assert scores[f"iou/{CITYSCAPES_CLASSES[ONLY_PREDICTED]}"] == 0.0
    assert abs(results["averageScoreClasses"] - scores["miou"]) < 1e-6


def test_confusion_matrix_agrees_on_the_evaluated_labels(evaluated):
    results, metric, _ = evaluated
    theirs = torch.tensor(results["confMatrix"], dtype=torch.long)
    ids = list(CITYSCAPES_LABEL_IDS)
    assert torch.equal(theirs[ids][:, ids], metric.confmat)


def test_class_tables_agree_with_cityscapesscripts():
    evaluated_labels = sorted(
        (label for label in cs_labels.labels if not label.ignoreInEval),
        key=lambda label: label.trainId,
    )
    assert [label.trainId for label in evaluated_labels] == list(range(19))
    assert tuple(label.name for label in evaluated_labels) == CITYSCAPES_CLASSES
    assert tuple(label.id for label in evaluated_labels) == CITYSCAPES_LABEL_IDS
    assert tuple(label.color for label in evaluated_labels) == CITYSCAPES_PALETTE
    for label in cs_labels.labels:
        if label.id >= 0:
            expected = 255 if label.ignoreInEval else label.trainId
            assert CITYSCAPES_ID_TO_TRAIN_ID[label.id].item() == expected, label.name
