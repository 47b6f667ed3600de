"""SegmentationMetrics against confusion matrices and IoUs worked out by hand, over batches,
logits and ids, MetricCollection prefixes and two CPU DDP ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex

from dam_lightning.data.labels import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    SYNTHIA_13_CLASSES,
    SYNTHIA_16_CLASSES,
)
from dam_lightning.metrics import (
    SegmentationMetrics,
    class_accuracy,
    segmentation_confusion_matrix,
    segmentation_scores,
    subset_only_iou,
    worst_class,
)

# ---- a 4-class case, every number worked out by hand --------------------------------------------
# road and car are labelled; bus is only predicted (IoU 0, counts in the mean); sky appears
# nowhere scored (predicted only on an ignored pixel): NaN, left out of the mean.
FOUR = ("road", "car", "bus", "sky")
LABEL = torch.tensor([[[0, 0, 0], [0, 1, 1], [1, 255, 255]]])
PRED = torch.tensor([[[0, 0, 0], [1, 1, 1], [2, 3, 0]]])
CONFMAT = [
    [3, 1, 0, 0],  # road: 3 right, 1 taken for car
    [0, 2, 1, 0],  # car: 2 right, 1 taken for bus
    [0, 0, 0, 0],
    [0, 0, 0, 0],
]
IOU = {"road": 3 / (4 + 3 - 3), "car": 2 / (3 + 3 - 2), "bus": 0 / (0 + 1 - 0), "sky": math.nan}


def test_class_accuracy_and_worst_class_of_the_hand_built_matrix():
    accuracy = class_accuracy(torch.tensor(CONFMAT))
    assert accuracy[:2].tolist() == [3 / 4, 2 / 3]
    assert accuracy[2:].isnan().all()  # bus and sky have no labels: not "got wrong"
    assert worst_class(torch.tensor(CONFMAT)) == (1, 2 / 3)  # car, not an unlabelled class
    tie = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 1, 1]])
    assert worst_class(tie) == (0, 0.5)  # the first of the classes tied at 1/2


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def as_floats(scores: dict) -> dict[str, float]:
    return {k: v.item() for k, v in scores.items()}


def test_confusion_matrix_matches_the_hand_count():
    assert segmentation_confusion_matrix(PRED, LABEL, num_classes=4).tolist() == CONFMAT


def test_scores_match_the_hand_computation():
    metric = SegmentationMetrics(FOUR)
    metric.update(PRED, LABEL)
    scores = as_floats(metric.compute())

    assert metric.confmat.tolist() == CONFMAT
    for name, iou in IOU.items():
        assert close(scores[f"iou/{name}"], iou), name
    assert close(scores["miou"], (0.75 + 0.5 + 0.0) / 3)  # sky excluded, bus counted
    assert close(scores["pixel_acc"], 5 / 7)
    assert close(scores["class_acc"], (3 / 4 + 2 / 3) / 2)  # only classes with labels
    assert scores["worst_class_iou"] == 0.0
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in metric.compute().values())


def test_absent_class_is_nan_not_zero_unlike_torchmetrics_jaccard():
    jaccard = MulticlassJaccardIndex(4, average="none", ignore_index=IGNORE_INDEX)
    assert jaccard(PRED, LABEL)[3].item() == 0.0  # the behaviour design.md warns about
    assert math.isnan(segmentation_scores(torch.tensor(CONFMAT), FOUR)["iou/sky"].item())


def test_nothing_scored_gives_nan_means_without_raising():
    scores = as_floats(segmentation_scores(torch.zeros(3, 3, dtype=torch.long), ["a", "b", "c"]))
    assert all(math.isnan(v) for v in scores.values())


# ---- 19 Cityscapes classes and the SYNTHIA 16/13 subsets ----------------------------------------
# (label, prediction, pixels). terrain (not in 16/13) is perfect, so a rescaled 19-class mean would
# differ from the direct subset mean; train is absent everywhere; fence is only predicted.
C = CITYSCAPES_CLASSES.index
PIXELS = [
    (C("road"), C("road"), 9), (C("road"), C("sidewalk"), 3), (C("sidewalk"), C("sidewalk"), 4),
    (C("building"), C("building"), 6), (C("building"), C("wall"), 2), (C("wall"), C("wall"), 1),
    (C("wall"), C("fence"), 1), (C("pole"), C("pole"), 2), (C("pole"), C("traffic sign"), 2),
    (C("traffic light"), C("traffic light"), 1), (C("traffic sign"), C("traffic sign"), 3),
    (C("vegetation"), C("vegetation"), 5), (C("vegetation"), C("terrain"), 1),
    (C("terrain"), C("terrain"), 7), (C("sky"), C("sky"), 8), (C("person"), C("rider"), 2),
    (C("person"), C("person"), 4), (C("rider"), C("rider"), 1), (C("car"), C("car"), 6),
    (C("car"), C("truck"), 2), (C("truck"), C("truck"), 3), (C("bus"), C("bus"), 2),
    (C("bus"), C("car"), 1), (C("motorcycle"), C("bicycle"), 1), (C("bicycle"), C("bicycle"), 2),
    (IGNORE_INDEX, C("train"), 5), (IGNORE_INDEX, C("road"), 4),
]  # fmt: skip


def pixel_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The PIXELS as a (2, 4, H) label/prediction pair, in a fixed shuffled order."""
    labels = [lab for lab, _, n in PIXELS for _ in range(n)]
    preds = [pred for _, pred, n in PIXELS for _ in range(n)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    assert len(labels) % 8 == 0, "PIXELS must fill two 4-row images"
    shape = (2, 4, len(labels) // 8)
    return torch.tensor(preds)[order].reshape(shape), torch.tensor(labels)[order].reshape(shape)


def hand_iou() -> dict[str, float]:
    """IoU per class from the PIXELS list: TP / (labelled + predicted - TP), NaN if 0/0."""
    tp, labelled, predicted = [0] * 19, [0] * 19, [0] * 19
    for lab, pred, n in PIXELS:
        if lab == IGNORE_INDEX:
            continue
        labelled[lab] += n
        predicted[pred] += n
        tp[lab] += n if lab == pred else 0
    return {
        name: tp[c] / (labelled[c] + predicted[c] - tp[c])
        if labelled[c] + predicted[c]
        else math.nan
        for c, name in enumerate(CITYSCAPES_CLASSES)
    }


def nan_mean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept)


def test_cityscapes_19_and_synthia_16_13_computed_over_each_subset():
    subsets = {"16": SYNTHIA_16_CLASSES, "13": SYNTHIA_13_CLASSES}
    metric = SegmentationMetrics(CITYSCAPES_CLASSES, subsets=subsets)
    metric.update(*pixel_arrays())
    scores = as_floats(metric.compute())
    iou = hand_iou()

    assert math.isnan(iou["train"]) and iou["fence"] == 0.0 and iou["terrain"] > 0.8
    for name in CITYSCAPES_CLASSES:
        assert close(scores[f"iou/{name}"], iou[name]), name
    miou_16 = nan_mean(iou[n] for n in SYNTHIA_16_CLASSES)
    miou_13 = nan_mean(iou[n] for n in SYNTHIA_13_CLASSES)
    assert close(scores["miou"], nan_mean(iou.values()))
    assert close(scores["miou_16"], miou_16)
    assert close(scores["miou_13"], miou_13)
    for key, subset in subsets.items():  # only pixels labelled with a subset class are scored
        kept = {C(n) for n in subset}
        tp = {c: 0 for c in kept}
        labelled, predicted = dict(tp), dict(tp)
        for lab, pred, n in PIXELS:
            if lab in kept:
                labelled[lab] += n
                tp[lab] += n if lab == pred else 0
                if pred in kept:
                    predicted[pred] += n
        seen = [c for c in kept if labelled[c] + predicted[c]]  # fence: only predicted, 0
        only = [tp[c] / (labelled[c] + predicted[c] - tp[c]) for c in seen]
        assert close(scores[f"miou_{key}_subset_only"], sum(only) / len(only)), key
    assert not close(scores["miou_16"], scores["miou"], tol=1e-3)  # its own mean, not the 19's
    assert scores["worst_class_iou"] == 0.0


# ---- the two subset conventions on a hand-built matrix ------------------------------------------
# terrain is outside the subset; bus is in it but only ever predicted, on a terrain pixel.
SUBSET_CLASSES = ("road", "car", "terrain", "sky", "bus")
SUBSET_CONFMAT = [
    [5, 1, 2, 0, 0],  # road: 5 right, 1 taken for car, 2 for terrain (outside the subset)
    [1, 3, 0, 0, 0],  # car
    [2, 1, 4, 0, 1],  # terrain: 2 taken for road, 1 for car, 1 for bus
    [0, 0, 0, 6, 0],  # sky
    [0, 0, 0, 0, 0],  # bus: never labelled
]
SUBSET = ["road", "car", "sky", "bus"]


def test_both_subset_conventions_match_the_hand_computation():
    scores = as_floats(
        segmentation_scores(torch.tensor(SUBSET_CONFMAT), SUBSET_CLASSES, {"4": SUBSET})
    )
    # every scored pixel counts: IoU = TP / (row + column - TP) of the whole matrix
    road, car, sky, bus = 5 / (8 + 8 - 5), 3 / (4 + 5 - 3), 6 / 6, 0 / (0 + 1 - 0)
    assert close(scores["miou_4"], (road + car + sky + bus) / 4)
    # subset only: terrain's row is dropped; road's 2 pixels taken for terrain stay wrong (FN)
    road, car, sky = 5 / (8 + 6 - 5), 3 / (4 + 4 - 3), 6 / 6  # bus: 0/0, NaN, left out
    assert close(scores["miou_4_subset_only"], (road + car + sky) / 3)
    assert close(scores["miou_4"], 0.4886364) and close(scores["miou_4_subset_only"], 0.7185185)
    per_class = subset_only_iou(torch.tensor(SUBSET_CONFMAT), [0, 1, 3, 4]).tolist()
    assert [round(v, 6) for v in per_class[:3]] == [0.555556, 0.6, 1.0]
    assert math.isnan(per_class[3])


def test_subset_only_equals_scoring_labels_mapped_to_the_subset():
    """The definition, checked the long way: labels outside the subset set to ignore_index and
    scored as a 19-class matrix; the subset's IoUs of that matrix are the subset-only IoUs."""
    preds, target = pixel_arrays()
    for subset in (SYNTHIA_16_CLASSES, SYNTHIA_13_CLASSES):
        kept = torch.tensor([CITYSCAPES_CLASSES.index(n) for n in subset])
        mapped = torch.where(torch.isin(target, kept), target, IGNORE_INDEX)
        confmat = segmentation_confusion_matrix(preds, mapped, 19)
        expected = segmentation_scores(confmat, CITYSCAPES_CLASSES, {"s": subset})["miou_s"]
        full = segmentation_confusion_matrix(preds, target, 19)
        got = segmentation_scores(full, CITYSCAPES_CLASSES, {"s": subset})
        assert close(got["miou_s_subset_only"].item(), expected.item())
        # PIXELS: terrain and truck pixels are predicted only as themselves (the 16 agree), but
        # pole pixels taken for traffic sign count against it in the 13 only when all count
        same = close(got["miou_s_subset_only"].item(), got["miou_s"].item(), tol=1e-3)
        assert same == (len(subset) == 16)


def test_all_pixels_convention_is_never_above_subset_only():
    """Same TP and FN per subset class, FP only more; a class only predicted on pixels outside
    the subset is 0 in one and left out (NaN) of the other."""
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        confmat = torch.randint(0, 4, (19, 19), generator=generator)
        confmat[torch.rand(19, generator=generator) < 0.3] = 0  # classes without labels
        for subset in (SYNTHIA_16_CLASSES, SYNTHIA_13_CLASSES):
            scores = segmentation_scores(confmat, CITYSCAPES_CLASSES, {"s": subset})
            assert scores["miou_s"] <= scores["miou_s_subset_only"] + 1e-6


def test_a_synthia_run_reports_both_conventions_for_16_and_13(tmp_path):
    """SYNTHIA -> Cityscapes as a run scores it: the task built from the SYNTHIA data's
    subsets, evaluating a tiny network on Cityscapes val fixture files."""
    from torch.utils.data import DataLoader

    from dam_lightning.data import SYNTHIA, Cityscapes, SegmentationTransform
    from dam_lightning.modules.task import make_task

    from .segmentation_fixtures import write_cityscapes, write_synthia

    synthia = SYNTHIA(write_synthia(tmp_path / "synthia", n=1).root)
    val = Cityscapes(
        write_cityscapes(tmp_path / "cityscapes").root,
        "val",
        transform=SegmentationTransform(size=None),
    )
    task = make_task("segmentation", 19, synthia.classes, synthia.class_subsets)
    net = torch.nn.Conv2d(3, 19, 1)  # "road" everywhere: IoU(road) = road pixels / scored ones
    torch.nn.init.zeros_(net.weight)
    with torch.no_grad():
        net.bias.copy_(torch.eye(19)[C("road")])
    scores = task.evaluate(net, DataLoader(val, batch_size=2), torch.device("cpu"))
    assert {"miou_16", "miou_13", "miou_16_subset_only", "miou_13_subset_only"} <= set(scores)

    labels = torch.cat([y[y != IGNORE_INDEX] for _, y in DataLoader(val, batch_size=2)])
    for key, subset in synthia.class_subsets.items():
        kept = torch.tensor([C(n) for n in subset])
        road, in_subset = (labels == C("road")).sum().item(), torch.isin(labels, kept).sum().item()
        assert in_subset < len(labels)  # the fixture has pixels of classes outside the subset
        assert close(scores[f"miou_{key}"], road / len(labels) / len(subset), 1e-6)
        assert close(scores[f"miou_{key}_subset_only"], road / in_subset / len(subset), 1e-6)


def test_logits_and_ids_give_the_same_scores():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 6, 7, generator=generator)
    target = torch.randint(0, 5, (3, 6, 7), generator=generator)
    target[:, 0] = IGNORE_INDEX
    from_logits, from_ids = SegmentationMetrics(list("abcde")), SegmentationMetrics(list("abcde"))
    from_logits.update(logits, target)
    from_ids.update(logits.argmax(dim=1), target)
    assert torch.equal(from_logits.confmat, from_ids.confmat)
    a, b = as_floats(from_logits.compute()), as_floats(from_ids.compute())
    assert all(close(a[k], b[k]) for k in a)


def test_several_batches_equal_one_batch_and_reset_clears():
    preds, target = pixel_arrays()
    whole, batched = (
        SegmentationMetrics(CITYSCAPES_CLASSES),
        SegmentationMetrics(CITYSCAPES_CLASSES),
    )
    whole.update(preds, target)
    batched.update(preds[:1], target[:1].to(torch.uint8))  # uint8 labels as PNGs decode
    batched.update(preds[1:], target[1:])
    assert torch.equal(whole.confmat, batched.confmat)
    batched.reset()
    assert batched.confmat.sum() == 0


def test_metric_collection_prefixes_the_flattened_keys():
    collection = MetricCollection({"seg": SegmentationMetrics(FOUR)}).clone(prefix="val/target/")
    collection.update(PRED, LABEL)
    scores = collection.compute()
    assert {"val/target/miou", "val/target/iou/road", "val/target/pixel_acc"} <= set(scores)
    assert close(scores["val/target/miou"].item(), (0.75 + 0.5) / 3)


@pytest.mark.parametrize(
    ("preds", "target", "message"),
    [
        (torch.randn(1, 4, 2, 3), torch.zeros(1, 4, 6, dtype=torch.long), "upsample the logits"),
        (torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 4, 6, dtype=torch.long), "2x3"),
        (torch.randn(1, 3, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long), "(N, 4, H, W)"),
        (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long), "must be integers"),
        (torch.zeros(1, 2, 3, dtype=torch.long), torch.full((1, 2, 3), 33), "CITYSCAPES_ID_TO"),
        (torch.full((1, 2, 3), 7), torch.zeros(1, 2, 3, dtype=torch.long), "predicted id 7"),
    ],
)
def test_bad_inputs_are_refused_with_the_fix(preds, target, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SegmentationMetrics(FOUR).update(preds, target)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown class names"):
        SegmentationMetrics(FOUR, subsets={"x": ["road", "tram"]})
    with pytest.raises(ValueError, match="repeats"):
        SegmentationMetrics(["road", "road"])
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetrics(FOUR, ignore_index=2)
    with pytest.raises(ValueError, match="does not fit 4"):
        segmentation_scores(torch.zeros(3, 3), FOUR)


def test_deterministic_mode_uses_plain_bincount():
    torch.use_deterministic_algorithms(True)
    try:
        assert segmentation_confusion_matrix(PRED, LABEL, 4).tolist() == CONFMAT
    finally:
        torch.use_deterministic_algorithms(False)


# ---- DDP: two gloo ranks, each counting half of the images --------------------------------------


def _ddp_rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        preds, target = pixel_arrays()
        metric = SegmentationMetrics(CITYSCAPES_CLASSES, {"16": SYNTHIA_16_CLASSES})
        metric.update(preds[rank : rank + 1], target[rank : rank + 1])
        scores = metric.compute()  # sums the confusion matrices, then restores the local one
        with metric.sync_context():
            confmat = metric.confmat.clone()
        if rank == 0:
            torch.save({"confmat": confmat, "scores": scores}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch: about 5 s, more on a busy machine
def test_ddp_sum_over_two_ranks_equals_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_rank, args=(_free_port(), out), nprocs=2, join=True)
    synced = torch.load(out)

    single = SegmentationMetrics(CITYSCAPES_CLASSES, {"16": SYNTHIA_16_CLASSES})
    single.update(*pixel_arrays())
    assert torch.equal(synced["confmat"], single.confmat)
    expected = as_floats(single.compute())
    assert all(close(synced["scores"][k].item(), v) for k, v in expected.items())
