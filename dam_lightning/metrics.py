"""Segmentation metrics on one confusion matrix: pixel accuracy, mean class accuracy, per-class
IoU, mIoU over all classes and over named class subsets in both conventions of the literature
(``miou_<key>`` and ``miou_<key>_subset_only``, method.md §5); and the per-class and
worst-class accuracy of any confusion matrix (classification too), computed here only.

Pure functions in the torchmetrics pipeline (validate -> format -> update -> reduce) under a thin
``Metric``. A class absent from both labels and predictions has IoU NaN and is left out of every
mean (torchmetrics' ``JaccardIndex`` would score it 0). Nothing here resizes logits (the task
upsamples them to the label size first) or deduplicates images across DDP ranks (the loader's job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification.confusion_matrix import (
    _multiclass_confusion_matrix_format,
)

from dam_lightning.data.labels import IGNORE_INDEX, class_indices
from dam_lightning.errors import ConfigError

__all__ = [
    "SegmentationMetrics",
    "class_accuracy",
    "segmentation_confusion_matrix",
    "segmentation_scores",
    "subset_only_iou",
    "worst_class",
]


# ---- validate ------------------------------------------------------------------------------------


def _class_arg_validation(
    class_names: Sequence[str], subsets: Mapping[str, Sequence[str]] | None
) -> None:
    """Refuse too few or repeated class names and subsets naming unknown classes."""
    if isinstance(class_names, str) or len(class_names) < 2:
        raise ConfigError(f"class_names must list at least 2 classes, got {class_names!r}")
    if len(set(class_names)) != len(class_names):
        repeated = sorted({name for name in class_names if list(class_names).count(name) > 1})
        raise ConfigError(f"class_names repeats {repeated}; every class needs its own name")
    for key, subset in (subsets or {}).items():
        if isinstance(subset, str) or not subset:
            raise ConfigError(
                f"subset {key!r} must be a non-empty list of class names, got {subset!r}"
            )
        class_indices(list(subset), tuple(class_names))


def _ignore_index_validation(ignore_index: int, num_classes: int) -> None:
    """Refuse an ignore_index that is also a class id."""
    if not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
        raise ConfigError(
            f"ignore_index must be an int outside the class ids 0..{num_classes - 1}, got "
            f"{ignore_index!r} (Cityscapes uses {IGNORE_INDEX})"
        )


def _segmentation_tensor_validation(preds: Tensor, target: Tensor, num_classes: int) -> None:
    """Refuse shapes and dtypes that would be scored wrongly: logits ``(N, C, H, W)`` or ids
    ``(N, H, W)`` against integer labels ``(N, H, W)`` of the same size."""
    if target.is_floating_point() or target.ndim < 2:
        raise ConfigError(
            f"labels must be an integer tensor (N, H, W), got {target.dtype} of shape "
            f"{tuple(target.shape)}"
        )
    if preds.ndim == target.ndim + 1:
        if not preds.is_floating_point() or preds.shape[1] != num_classes:
            raise ConfigError(
                f"logits must be a float tensor (N, {num_classes}, H, W), got {preds.dtype} of "
                f"shape {tuple(preds.shape)}"
            )
        pred_batch, pred_size = preds.shape[0], preds.shape[2:]
    elif preds.ndim == target.ndim:
        if preds.is_floating_point():
            raise ConfigError(
                f"predicted ids (N, H, W) must be integers, got {preds.dtype}; pass logits "
                f"(N, {num_classes}, H, W) to take the argmax here"
            )
        pred_batch, pred_size = preds.shape[0], preds.shape[1:]
    else:
        raise ConfigError(
            f"predictions of shape {tuple(preds.shape)} fit neither logits (N, C, H, W) nor ids "
            f"(N, H, W) for labels of shape {tuple(target.shape)}"
        )
    if pred_batch != target.shape[0]:
        raise ConfigError(f"{pred_batch} predictions for {target.shape[0]} labels")
    if pred_size != target.shape[1:]:
        raise ConfigError(
            f"predictions are {'x'.join(map(str, pred_size))} but labels are "
            f"{'x'.join(map(str, target.shape[1:]))}; upsample the logits to the label size "
            "(bilinear) before the update"
        )


def _check_ids_in_range(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Refuse ids outside ``0..num_classes-1`` among the scored pixels (they would land in the
    wrong cell of the confusion matrix). Costs one reduction and one sync per update."""
    if target.numel() == 0:
        return
    low_t, high_t, low_p, high_p = torch.stack(
        [target.min(), target.max(), preds.min(), preds.max()]
    ).tolist()
    for low, high, what in ((low_t, high_t, "label"), (low_p, high_p, "predicted id")):
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ConfigError(
                f"{what} {bad} is outside 0..{num_classes - 1} and is not ignore_index "
                f"{ignore_index}; map dataset ids to trainIds first (e.g. "
                "CITYSCAPES_ID_TO_TRAIN_ID[label]) or fix num_classes"
            )


# ---- format, update ------------------------------------------------------------------------------


def _segmentation_format(preds: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Flat int64 predicted ids and labels of the scored pixels (argmax of logits, ignored
    pixels removed), through torchmetrics' confusion-matrix formatting."""
    preds, target = _multiclass_confusion_matrix_format(preds, target, ignore_index)
    return preds.long(), target.long()


def _segmentation_update(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """The ``(C, C)`` int64 counts (rows = label, columns = prediction) of flat valid ids.

    ``torch.bincount`` directly, not torchmetrics' ``_bincount``: without weights it is allowed
    under ``torch.use_deterministic_algorithms`` (also on CUDA), where ``_bincount``'s fallback
    would allocate a (pixels x C^2) table, gigabytes for one 2048x1024 label.
    """
    pairs = target * num_classes + preds
    counts = torch.bincount(pairs, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def segmentation_confusion_matrix(
    preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The ``(C, C)`` int64 confusion matrix (rows = label, columns = prediction) of logits
    ``(N, C, H, W)`` or predicted ids ``(N, H, W)`` against labels ``(N, H, W)``; pixels labelled
    ``ignore_index`` are not counted.

    Example:
        >>> preds = torch.tensor([[[0, 1], [1, 2]]])
        >>> target = torch.tensor([[[0, 1], [2, 255]]])
        >>> segmentation_confusion_matrix(preds, target, num_classes=3).tolist()
        [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    """
    _segmentation_tensor_validation(preds, target, num_classes)
    flat_preds, flat_target = _segmentation_format(preds, target, ignore_index)
    _check_ids_in_range(flat_preds, flat_target, num_classes, ignore_index)
    return _segmentation_update(flat_preds, flat_target, num_classes)


# ---- reduce --------------------------------------------------------------------------------------


def _nan_min(values: Tensor) -> Tensor:
    """The smallest non-NaN value; NaN when every value is NaN."""
    finite = values[~values.isnan()]
    return finite.min() if finite.numel() else values.new_tensor(float("nan"))


def class_accuracy(confmat: Tensor) -> Tensor:
    """Per-class accuracy TP / (TP + FN) of a confusion matrix (rows = label, columns =
    prediction), as (C,) float64: the share of each class's labels predicted as that class.
    A class without labels has accuracy NaN (0/0), not 0: it was never got wrong.

    Example:
        >>> class_accuracy(torch.tensor([[3, 1, 0], [0, 0, 2], [0, 0, 0]])).tolist()
        [0.75, 0.0, nan]
    """
    counts = confmat.double()
    return counts.diagonal() / counts.sum(dim=1)


def worst_class(confmat: Tensor) -> tuple[int, float]:
    """The class the network gets most wrong: (its index, its accuracy) for the smallest
    ``class_accuracy`` over the classes with labels (the first on a tie); ``(-1, nan)`` when no
    class has labels. Micro accuracy hides one whole class mapped onto another; this shows it.

    Example:
        >>> worst_class(torch.tensor([[2, 0, 0], [0, 1, 1], [0, 0, 0]]))  # class 2: no labels
        (1, 0.5)
        >>> worst_class(torch.zeros(2, 2, dtype=torch.long))
        (-1, nan)
    """
    accuracy = class_accuracy(confmat)
    if accuracy.isnan().all():
        return -1, float("nan")
    index = int(accuracy.nan_to_num(nan=float("inf")).argmin())
    return index, accuracy[index].item()


def _class_iou(confmat: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN) in float64; 0/0 (a class neither labelled nor
    predicted anywhere) gives NaN."""
    counts = confmat.double()
    tp = counts.diagonal()
    return tp / (counts.sum(dim=1) + counts.sum(dim=0) - tp)


def subset_only_iou(confmat: Tensor, indices: Sequence[int]) -> Tensor:
    """Per-class IoU of the classes ``indices`` when only pixels labelled with one of them are
    scored: the evaluation of ground truth mapped to the subset, every other class ignored.

    Of the ``(C, C)`` confusion matrix (rows = label, columns = prediction) only the subset's
    rows count. For a subset class ``c``: TP = ``M[c, c]``; FN = the rest of row ``c``, a
    prediction outside the subset included (a road pixel taken for terrain is wrong, it is not
    remapped); FP = ``M[r, c]`` over the other subset rows ``r`` only (a terrain pixel taken for
    vegetation no longer counts against vegetation). IoU = TP / (TP + FP + FN), NaN when 0/0.
    For a network that can only predict subset classes (16 or 13 outputs) this is exactly the
    usual evaluation against labels mapped to the subset.

    Example:
        >>> confmat = torch.tensor([[3, 1, 1], [0, 2, 0], [2, 1, 5]])  # class 2 not in subset
        >>> [round(v, 4) for v in subset_only_iou(confmat, [0, 1]).tolist()]  # 3/5, 2/3
        [0.6, 0.6667]
    """
    rows = confmat.double()[list(indices)]
    square = rows[:, list(indices)]
    tp = square.diagonal()
    return tp / (rows.sum(dim=1) + square.sum(dim=0) - tp)


def segmentation_scores(
    confmat: Tensor,
    class_names: Sequence[str],
    subsets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Tensor]:
    """Scores of one confusion matrix (rows = label, columns = prediction), as float32 scalars:

    - ``pixel_acc``: correctly predicted pixels / scored pixels;
    - ``class_acc``: mean over the classes present in the labels of TP / (TP + FN);
    - ``miou``: NaN-mean over classes of IoU = TP / (TP + FP + FN); a class absent from labels
      and predictions is NaN and left out (a class only predicted has IoU 0 and counts);
    - ``worst_class_iou``: the smallest non-NaN IoU;
    - ``iou/<class name>``: every class's IoU (NaN when absent);
    - ``miou_<key>`` for each subset: the NaN-mean of the subset's own IoUs (never a rescaled
      full mean), e.g. ``subsets={"16": SYNTHIA_16_CLASSES, "13": SYNTHIA_13_CLASSES}``. Every
      scored pixel counts: a pixel labelled with a class outside the subset (SYNTHIA's terrain,
      truck, train) and predicted as a subset class is a false positive of that class;
    - ``miou_<key>_subset_only`` for each subset: the NaN-mean of :func:`subset_only_iou`, the
      other convention of the literature: only pixels labelled with a subset class are scored
      (ground truth mapped to the subset, everything else ignored); their predictions outside
      the subset count as wrong (false negatives), not remapped. Both come from the one
      confusion matrix.

    A mean with nothing to average is NaN.

    Example:
        >>> confmat = torch.tensor([[3, 1, 0], [0, 0, 2], [0, 0, 0]])  # class 2 only predicted
        >>> subsets = {"no_bus": ["road", "car"]}
        >>> scores = segmentation_scores(confmat, ["road", "car", "bus"], subsets)
        >>> {k: round(v.item(), 4) for k, v in scores.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'pixel_acc': 0.5, 'class_acc': 0.375, 'miou': 0.25, 'worst_class_iou': 0.0,
         'iou/road': 0.75, 'iou/car': 0.0, 'iou/bus': 0.0, 'miou_no_bus': 0.375,
         'miou_no_bus_subset_only': 0.375}
        >>> segmentation_scores(torch.zeros(2, 2, dtype=torch.long), ["a", "b"])["miou"]
        tensor(nan)
    """
    _class_arg_validation(class_names, subsets)
    if confmat.shape != (len(class_names), len(class_names)):
        raise ConfigError(
            f"confusion matrix of shape {tuple(confmat.shape)} does not fit {len(class_names)} "
            "class names; pass one name per row"
        )
    counts = confmat.double()
    iou = _class_iou(confmat)
    scores = {
        "pixel_acc": counts.diagonal().sum() / counts.sum(),
        "class_acc": class_accuracy(confmat).nanmean(),
        "miou": iou.nanmean(),
        "worst_class_iou": _nan_min(iou),
    }
    scores.update({f"iou/{name}": iou[c] for c, name in enumerate(class_names)})
    for key, subset in (subsets or {}).items():
        indices = class_indices(list(subset), tuple(class_names))
        scores[f"miou_{key}"] = iou[indices].nanmean()
        scores[f"miou_{key}_subset_only"] = subset_only_iou(confmat, indices).nanmean()
    return {name: value.float() for name, value in scores.items()}


# ---- the Metric ----------------------------------------------------------------------------------


class SegmentationMetrics(Metric):
    """Accumulates one ``(C, C)`` int64 confusion matrix (``.confmat``, rows = label, columns =
    prediction; summed across DDP ranks) and reports :func:`segmentation_scores` as a dict.
    ``compute()`` keeps the matrix it scored as ``.computed_confmat`` (summed across ranks; it
    outlives ``reset()``), for pictures and tables of the last evaluation.

    ``update(preds, target)``: logits ``(N, C, H, W)`` (argmax over dim 1) or predicted ids
    ``(N, H, W)``, against labels ``(N, H, W)`` of the same H, W; ``ignore_index`` pixels are
    skipped. In a ``MetricCollection`` the dict is flattened, so ``clone(prefix="val/target/")``
    gives ``val/target/miou``, ``val/target/iou/road``...

    Args:
        class_names: one name per class id, e.g. ``CITYSCAPES_CLASSES``.
        subsets: extra means over named class subsets, reported as ``miou_<key>`` (every
            scored pixel counts) and ``miou_<key>_subset_only`` (only pixels labelled with a
            subset class count), see :func:`segmentation_scores`.
        ignore_index: label value that is not scored.
        kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``...).

    Example:
        >>> metric = SegmentationMetrics(["road", "car", "bus"])
        >>> metric.update(torch.tensor([[[0, 0], [1, 2]]]), torch.tensor([[[0, 255], [1, 1]]]))
        >>> metric.confmat.tolist()
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
        >>> scores = metric.compute()
        >>> {k: round(v.item(), 3) for k, v in scores.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'pixel_acc': 0.667, 'class_acc': 0.75, 'miou': 0.5, 'worst_class_iou': 0.0,
         'iou/road': 1.0, 'iou/car': 0.5, 'iou/bus': 0.0}
        >>> metric.reset(); metric.confmat.sum().item(), metric.computed_confmat.sum().item()
        (0, 3)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confmat: Tensor

    def __init__(
        self,
        class_names: Sequence[str],
        subsets: Mapping[str, Sequence[str]] | None = None,
        ignore_index: int = IGNORE_INDEX,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _class_arg_validation(class_names, subsets)
        _ignore_index_validation(ignore_index, len(class_names))
        self.class_names = tuple(class_names)
        self.subsets = {key: tuple(names) for key, names in (subsets or {}).items()}
        self.ignore_index = ignore_index
        self.num_classes = len(self.class_names)
        zeros = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        self.add_state("confmat", zeros, dist_reduce_fx="sum")
        self.computed_confmat: Tensor | None = None

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count one batch of logits or predicted ids against its labels."""
        self.confmat += segmentation_confusion_matrix(
            preds, target, self.num_classes, self.ignore_index
        )

    def compute(self) -> dict[str, Tensor]:
        """The scores of everything counted since the last reset."""
        self.computed_confmat = self.confmat.clone()  # here summed across DDP ranks
        return segmentation_scores(self.confmat, self.class_names, self.subsets)
