"""DigitScenes: determinism per seed, the per-pixel labels against a reference computed here from
the digit images, disjoint digit splits, and the two appearances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dam_lightning.data import DigitScenes, SynDigits, UCIDigits
from dam_lightning.data.digit_scenes import split_indices
from dam_lightning.data.labels import DIGIT_SCENE_CLASSES

BACKGROUND = DIGIT_SCENE_CLASSES.index("background")


@pytest.fixture(scope="module")
def uci():
    return UCIDigits()


@pytest.fixture(scope="module")
def syn():
    return SynDigits(200, seed=0)


def test_the_same_seed_gives_identical_scenes_and_another_seed_different_ones(uci):
    def build(seed):
        return DigitScenes(uci, 12, split="adapt", appearance="camera", seed=seed)

    a, b, c = build(3), build(3), build(4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.layouts == b.layouts
    assert not torch.equal(a.labels, c.labels)


def test_labels_are_the_digit_on_strokes_background_elsewhere_and_255_on_the_rim(syn):
    scenes = DigitScenes(syn, 10, digits_per_scene=(1, 1), digit_size=(24, 30), seed=1)
    for (_, label), layout in zip(scenes, scenes.layouts, strict=True):
        [(index, digit, top, left, side)] = layout
        assert digit == int(syn.labels[index])
        # reference coverage: the digit image scaled to its side, put on an empty canvas
        alpha = F.interpolate(
            syn.images[index][None], size=(side, side), mode="bilinear", antialias=True
        )[0, 0].clamp(0, 1)
        canvas = torch.zeros(64 + 2 * side, 64 + 2 * side)
        canvas[top + side : top + 2 * side, left + side : left + 2 * side] = alpha
        coverage = canvas[side : side + 64, side : side + 64]
        expected = torch.full((64, 64), BACKGROUND)
        expected[(coverage >= 0.1) & (coverage < 0.5)] = 255
        expected[coverage >= 0.5] = digit
        assert torch.equal(label, expected)
        assert (label == digit).any() and (label == 255).any()


def test_several_digits_keep_their_own_classes(uci):
    scenes = DigitScenes(uci, 20, split="test", appearance="camera", seed=0)
    for (_, label), layout in zip(scenes, scenes.layouts, strict=True):
        assert 1 <= len(layout) <= 4
        present = set(label.unique().tolist())
        assert present <= {d for _, d, *_ in layout} | {BACKGROUND, 255}
        for _, digit, top, left, side in layout:  # each digit's class inside its own square
            box = label[max(top, 0) : top + side, max(left, 0) : left + side]
            assert (box == digit).any()


def test_the_splits_share_out_the_digit_images_disjointly(uci):
    parts = {s: set(split_indices(len(uci), s).tolist()) for s in ("adapt", "val", "test")}
    assert parts["adapt"].isdisjoint(parts["val"] | parts["test"])
    assert parts["val"].isdisjoint(parts["test"])
    assert set.union(*parts.values()) == set(range(len(uci)))
    adapt = DigitScenes(uci, 400, split="adapt", appearance="camera", seed=0)
    for split in ("val", "test"):
        scored = DigitScenes(uci, 100, split=split, appearance="camera", seed=0)
        assert scored.digit_indices <= parts[split]
        assert adapt.digit_indices.isdisjoint(scored.digit_indices)


def test_renders_are_flat_grey_and_camera_scenes_are_not(syn):
    render = DigitScenes(syn, 6, appearance="render", seed=0)
    camera = DigitScenes(syn, 6, appearance="camera", seed=0)
    assert render.layouts == camera.layouts and torch.equal(render.labels, camera.labels)
    for (r, label), (c, _) in zip(render, camera, strict=True):
        background = label == BACKGROUND
        assert torch.equal(r[0], r[1]) and torch.equal(r[0], r[2])  # grey
        flat = r[0][background]  # one flat colour, up to the faint edge below the rim
        assert float(flat.max() - flat.min()) <= 0.1 * float(r.max() - r.min()) + 1e-6
        assert float((flat == flat.min()).float().mean()) > 0.5
        assert c[0][background].std() > 0.01 and not torch.equal(c[0], c[1])
        assert 0 <= float(c.min()) and float(c.max()) <= 1


def test_it_is_a_segmentation_dataset_for_the_data_module(uci):
    from dam_lightning.data import DomainAdaptationDataModule

    scenes = DigitScenes(uci, 4, split="val")
    data = DomainAdaptationDataModule(scenes, scenes, batch_size=2)
    assert (data.task, data.num_classes, data.class_names) == (
        "segmentation",
        11,
        list(DIGIT_SCENE_CLASSES),
    )
    image, label = scenes[0]
    assert image.dtype == torch.float32 and label.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "train"}, "split must be one of"),
        ({"appearance": "photo"}, "appearance must be"),
        ({"digit_size": (30, 80)}, "digit_size"),
        ({"num_scenes": 0}, "num_scenes"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named(uci, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitScenes(uci, **{"num_scenes": 2, **kwargs})


def test_split_indices_do_not_depend_on_the_scene_seed():
    assert np.array_equal(split_indices(100, "test", 0), split_indices(100, "test", 0))
    assert not np.array_equal(split_indices(100, "test", 0), split_indices(100, "test", 1))


def test_predictions_of_scenes_are_named_after_their_set_not_a_bare_index():
    """``predict`` on the segmentation demo names its PNGs by split, appearance and index
    (issue 22: ``000000.png`` said nothing), through a Subset as the loaders give them."""
    from torch.utils.data import Subset

    from dam_lightning.callbacks.predictions import _DatasetView

    scenes = DigitScenes(UCIDigits(), num_scenes=4, split="test", appearance="camera")
    assert _DatasetView(Subset(scenes, [3, 1])).item_name(0) == "test_camera_00003"
