"""Segmentation datasets on tiny trees written in the real formats (tests/segmentation_fixtures):
id -> trainId pixel by pixel against an independent mapping, naming and order, label sizes, joint
augmentation (no interpolated mask values, image and mask aligned), GTA5's size policies,
unlabelled sets, and every error message."""

from __future__ import annotations

import logging
import pickle
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dam_lightning.data import GTA5, SYNTHIA, Cityscapes, SegmentationDataset
from dam_lightning.data.labels import CITYSCAPES_LABEL_IDS, SYNTHIA_13_CLASSES
from dam_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform

from .segmentation_fixtures import (
    fixture_colour,
    truncate,
    write_cityscapes,
    write_gta5,
    write_png16,
    write_synthia,
)

# Written out from the method notes (docs/method.md §6), independently of data/labels.py.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
SYNTHIA_TRAIN_IDS = {
    1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6,
    17: 12, 19: 15, 21: 3,
}  # fmt: skip


def expected_train_ids(ids: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """The reference mapping: pixel by pixel through a dict, 255 for anything not in it."""
    return np.vectorize(lambda i: mapping.get(int(i), 255), otypes=[np.int64])(ids)


def as_uint8_image(image: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation: (3, H, W) float -> (H, W, 3) values in 0..255."""
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


@pytest.fixture
def cityscapes(tmp_path):
    return write_cityscapes(tmp_path / "cityscapes")


@pytest.fixture
def gta5(tmp_path):
    return write_gta5(tmp_path / "gta5")


@pytest.fixture
def synthia(tmp_path):
    return write_synthia(tmp_path / "synthia")


# ---- reading and mapping, pixel by pixel ---------------------------------------------------------


def test_cityscapes_maps_label_ids_to_train_ids_pixel_by_pixel(cityscapes):
    ds = Cityscapes(cityscapes.root, "val", transform=SegmentationTransform(size=None))
    assert len(ds) == 4
    for index, name in enumerate(cityscapes.names):
        image, label = ds[index]
        assert image.dtype == torch.float32 and label.dtype == torch.uint8
        expected = expected_train_ids(cityscapes.labels[name], CITYSCAPES_TRAIN_IDS)
        np.testing.assert_array_equal(label.numpy(), expected)
        np.testing.assert_allclose(as_uint8_image(image), cityscapes.images[name], atol=1e-3)
    labels = torch.cat([ds[i][1].flatten() for i in range(len(ds))])
    assert 255 in labels and labels[labels != 255].max() <= 18  # void ids present, all ignored


def test_cityscapes_two_cities_sorted_with_item_names(cityscapes):
    ds = Cityscapes(cityscapes.root, "val")
    names = [ds.item_name(i) for i in range(len(ds))]
    assert names == sorted(names) == cityscapes.names
    assert names[0] == "aachen/aachen_000000_000019" and names[-1].startswith("bochum/bochum_")
    assert [ds.image_path(i) for i in range(len(ds))] == [cityscapes.image_files[n] for n in names]
    assert [ds.label_path(i) for i in range(len(ds))] == [cityscapes.label_files[n] for n in names]
    assert repr(ds) == "Cityscapes(split='val', size=(512, 1024), images=4)"
    assert ds.name == "Cityscapes-val" and ds.num_classes == 19 and ds.task == "segmentation"
    assert ds.label_ids == CITYSCAPES_LABEL_IDS and ds.class_subsets == {}


def test_gta5_reads_palette_indices_not_colours(gta5):
    ds = GTA5(gta5.root, transform=SegmentationTransform(size=None))
    assert (
        [ds.item_name(i) for i in range(len(ds))]
        == gta5.names
        == ["00001", "00002", "00003", "00004"]
    )
    for index, name in enumerate(gta5.names):
        image, label = ds[index]
        written = gta5.labels[name]
        if written.shape != label.shape:  # the mismatched pair: checked in its own test
            continue
        np.testing.assert_array_equal(
            label.numpy(), expected_train_ids(written, CITYSCAPES_TRAIN_IDS)
        )
        np.testing.assert_allclose(as_uint8_image(image), gta5.images[name], atol=1e-3)
    assert Image.open(gta5.label_files["00001"]).mode == "P"


def test_synthia_reads_16_bit_channel_zero_of_3_and_4_channel_labels(synthia):
    ds = SYNTHIA(synthia.root, transform=SegmentationTransform(size=None))
    assert (
        [ds.item_name(i) for i in range(len(ds))]
        == synthia.names
        == ["0000000", "0000001", "0000002"]
    )
    assert int(max(v.max() for v in synthia.instances.values())) > 255  # 16 bits are exercised
    for index, name in enumerate(synthia.names):
        image, label = ds[index]
        np.testing.assert_array_equal(
            label.numpy(), expected_train_ids(synthia.labels[name], SYNTHIA_TRAIN_IDS)
        )
        np.testing.assert_allclose(
            as_uint8_image(image), synthia.images[name], atol=1e-3
        )  # RGBA -> RGB
    assert ds.classes[13] == "car" and ds.class_subsets["13"] == SYNTHIA_13_CLASSES
    assert len(ds.class_subsets["16"]) == 16 and ds.label_ids == CITYSCAPES_LABEL_IDS


# ---- sizes and augmentation ----------------------------------------------------------------------


def test_label_size_native_versus_input(cityscapes):
    small = SegmentationTransform(size=(16, 32))
    native = Cityscapes(cityscapes.root, "val", small)  # val: labels at file resolution
    image, label = native[0]
    assert image.shape == (3, 16, 32) and label.shape == (32, 64)
    resized = Cityscapes(cityscapes.root, "val", replace(small, label_size="input"))
    image, label = resized[0]
    assert image.shape == (3, 16, 32) and label.shape == (16, 32)
    full = native[0][1]
    assert set(label.unique().tolist()) <= set(full.unique().tolist())  # nearest: no new values
    # halving with nearest neighbour at pixel centres picks every other pixel, from the second
    np.testing.assert_array_equal(label.numpy(), full[1::2, 1::2].numpy())


def test_train_split_defaults_to_labels_at_input_size(tmp_path):
    root = write_cityscapes(tmp_path, split="train").root
    image, label = Cityscapes(root, "train", transform=SegmentationTransform(size=(16, 32)))[0]
    assert image.shape == (3, 16, 32) and label.shape == (16, 32)


@pytest.mark.parametrize("family", ["cityscapes", "synthia"])
def test_train_augment_keeps_mask_values_and_alignment(tmp_path, family):
    if family == "cityscapes":
        written = write_cityscapes(tmp_path, split="train", per_city=1)
        augment = SegmentationTransform(size=(32, 64), train_augment=True, crop_size=(24, 40))
        ds = Cityscapes(written.root, "train", augment)
        lut = CITYSCAPES_TRAIN_IDS
    else:
        written = write_synthia(tmp_path, n=2)
        augment = SegmentationTransform(size=(24, 40), train_augment=True, crop_size=(20, 36))
        ds = SYNTHIA(written.root, transform=augment)
        lut = SYNTHIA_TRAIN_IDS
    train_id_to_id = {t: i for i, t in lut.items()}
    torch.manual_seed(0)
    flipped_once = padded_once = False
    errors = []
    for _ in range(12):
        for index, name in enumerate(written.names):
            image, label = ds[index]
            assert (
                image.shape == (3, *ds.transform.crop_size)
                and label.shape == ds.transform.crop_size
            )
            allowed = set(expected_train_ids(written.labels[name], lut).flatten().tolist()) | {255}
            assert set(label.unique().tolist()) <= allowed  # never an interpolated value
            pixels = as_uint8_image(image)
            padding = np.abs(pixels).max(-1) < 1  # the crop pads the image with black ...
            assert (label.numpy()[padding] == 255).all()  # ... and the mask with 255
            padded_once |= bool(padding.any())
            # inside a region (5x5 neighbourhood of one trainId: the antialiasing filter of a
            # 0.5 downscale reaches 2 pixels) the colour is that id's colour
            scored = (label != 255) & _interior(label)
            ids = np.vectorize(train_id_to_id.get)(label.numpy()[scored.numpy()])
            errors.append(np.abs(pixels[scored.numpy()] - fixture_colour(ids)).max(-1))
            flipped_once |= _looks_flipped(image, written.images[name])
    errors = np.concatenate(errors)
    assert len(errors) > 500 and (errors < 9).mean() > 0.97, (len(errors), (errors < 9).mean())
    assert padded_once and flipped_once  # the random scale and flip did happen


def _interior(label: torch.Tensor) -> torch.Tensor:
    """Pixels whose 5x5 neighbourhood holds a single value (away from region borders)."""
    padded = F.pad(label[None, None].float(), (2, 2, 2, 2), mode="replicate")[0, 0]
    windows = padded.unfold(0, 5, 1).unfold(1, 5, 1)
    return windows.amax((-2, -1)) == windows.amin((-2, -1))


def _looks_flipped(image: torch.Tensor, written: np.ndarray) -> bool:
    """Whether the augmented image correlates better with the flipped original (rough)."""
    small = torch.from_numpy(as_uint8_image(image)).permute(2, 0, 1)[None]
    original = torch.from_numpy(written).permute(2, 0, 1)[None].float()
    original = F.interpolate(original, size=small.shape[-2:], mode="bilinear")
    error = (small - original).abs().mean()
    return bool((small - original.flip(-1)).abs().mean() < error)


def test_transform_never_interpolates_masks():
    mask = torch.randint(0, 40, (17, 23), dtype=torch.uint8)
    image = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    for size in [(5, 7), (40, 61), (17, 50)]:
        _, resized = SegmentationTransform(size)(image, mask)
        assert resized.shape == size and resized.dtype == torch.uint8
        assert set(resized.unique().tolist()) <= set(mask.unique().tolist())
    torch.manual_seed(0)
    augment = SegmentationTransform((17, 23), train_augment=True, scale_range=(0.3, 2.1))
    for _ in range(10):
        _, out = augment(image, mask)
        assert set(out.unique().tolist()) <= set(mask.unique().tolist()) | {255}


def test_eval_view_is_deterministic_and_leaves_the_original_augmenting(cityscapes):
    plain = SegmentationTransform(size=(16, 32), label_size="input")
    ds = Cityscapes(cityscapes.root, "val", replace(plain, train_augment=True))
    view = ds.eval_view()
    assert ds.train_augment and not view.train_augment and len(view) == len(ds)
    first, again = view[1], view[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    plain = Cityscapes(cityscapes.root, "val", plain)[1]
    assert torch.equal(first[0], plain[0]) and torch.equal(first[1], plain[1])
    assert view.item_name(1) == ds.item_name(1) and "train_augment" not in repr(view)


def test_datasets_pickle_for_dataloader_workers(cityscapes):
    augment = SegmentationTransform(size=(16, 32), label_size="input", train_augment=True)
    ds = Cityscapes(cityscapes.root, "val", augment)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == len(ds) and clone.item_name(3) == ds.item_name(3)
    images, labels = next(iter(torch.utils.data.DataLoader(clone.eval_view(), batch_size=2)))
    assert images.shape == (2, 3, 16, 32) and labels.shape == (2, 16, 32)


# ---- GTA5 size mismatches ------------------------------------------------------------------------


def test_gta5_resize_policy_resizes_the_label_nearest(gta5, caplog):
    with caplog.at_level(logging.WARNING, logger="dam_lightning.data.gta5"):
        ds = GTA5(gta5.root, size_mismatch="resize", transform=SegmentationTransform(size=None))
    assert len(ds) == 4
    assert "1 of 4 pairs differ in size" in caplog.text and "00002.png" in caplog.text
    image, label = ds[1]
    assert label.shape == image.shape[-2:] == (24, 44)
    small = torch.from_numpy(expected_train_ids(gta5.labels["00002"], CITYSCAPES_TRAIN_IDS))
    expected = F.interpolate(small[None, None].float(), (24, 44), mode="nearest-exact")[0, 0]
    assert torch.equal(label, expected.long())
    assert GTA5(gta5.root, transform=SegmentationTransform(size=(12, 22)))[1][1].shape == (12, 22)


def test_gta5_skip_policy_drops_the_pair(gta5, caplog):
    with caplog.at_level(logging.WARNING, logger="dam_lightning.data.gta5"):
        ds = GTA5(gta5.root, size_mismatch="skip", transform=SegmentationTransform(size=None))
    assert [ds.item_name(i) for i in range(len(ds))] == ["00001", "00003", "00004"]
    assert "skipped" in caplog.text


def test_gta5_error_policy_names_file_sizes_and_fix(gta5):
    with pytest.raises(
        ValueError, match=r"00002\.png is 41x22 but its image 00002\.png is 44x24"
    ) as err:
        GTA5(gta5.root, size_mismatch="error")
    assert 'size_mismatch="resize"' in str(err.value)
    with pytest.raises(ValueError, match="size_mismatch must be"):
        GTA5(gta5.root, size_mismatch="crop")


def test_gta5_split_file_selects_items(gta5, tmp_path):
    split = tmp_path / "train.txt"
    split.write_text("1\n00004.png\n# a comment\n\n")
    ds = GTA5(gta5.root, split_file=split)
    assert [ds.item_name(i) for i in range(len(ds))] == ["00001", "00004"]
    assert ds.name == "GTA5-train"
    split.write_text("1\n77\n")
    with pytest.raises(FileNotFoundError, match="00077"):
        GTA5(gta5.root, split_file=split)


# ---- unlabelled sets -----------------------------------------------------------------------------


def test_unlabelled_sets_never_open_labels(cityscapes, gta5, synthia, monkeypatch):
    def refuse(self, path):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(SegmentationDataset, "read_label", refuse)
    monkeypatch.setattr(SYNTHIA, "read_label", refuse)
    for folder in (cityscapes.root / "gtFine", gta5.root / "labels", synthia.root / "GT"):
        shutil.rmtree(folder)
    small = SegmentationTransform(size=(8, 16))
    datasets = [
        Cityscapes(cityscapes.root, "val", labelled=False, transform=small),
        GTA5(gta5.root, labelled=False, transform=small),
        SYNTHIA(synthia.root, labelled=False, transform=small),
    ]
    for ds in datasets:
        item = ds[0]
        assert isinstance(item, torch.Tensor) and item.shape == (3, 8, 16)
        assert ds.label_path(0) is None and "labelled=False" in repr(ds)
    eval_batch = next(iter(torch.utils.data.DataLoader(datasets[0].eval_view(), batch_size=4)))
    assert eval_batch.shape == (4, 3, 8, 16)


def test_cityscapes_test_split_is_unlabelled_by_default(tmp_path):
    root = write_cityscapes(tmp_path, split="test").root
    shutil.rmtree(root / "gtFine")
    ds = Cityscapes(root, "test", transform=SegmentationTransform(size=(8, 16)))
    assert not ds.labelled and ds[0].shape == (3, 8, 16)


# ---- errors --------------------------------------------------------------------------------------


def test_missing_root_names_folder_and_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*data\.target\.init_args\.root"):
        Cityscapes(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"data\.source\.init_args\.root"):
        GTA5(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"data\.source\.init_args\.root"):
        SYNTHIA(tmp_path / "nowhere")


def test_no_pairs_names_the_pattern_searched(tmp_path, cityscapes):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val/\*/\*_leftImg8bit\.png"):
        Cityscapes(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train.*splits found.*'val'"):
        Cityscapes(cityscapes.root, "train")
    with pytest.raises(FileNotFoundError, match=r"images/\*\.png"):
        GTA5(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"RGB/\*\.png"):
        SYNTHIA(tmp_path / "empty")


def test_unpaired_files_are_named_with_counts(cityscapes, gta5, synthia):
    cityscapes.label_files["bochum/bochum_000001_000026"].unlink()
    with pytest.raises(
        ValueError, match=r"1 of 4 images have no label.*bochum_000001_000026"
    ) as err:
        Cityscapes(cityscapes.root, "val")
    assert "_gtFine_labelIds.png" in str(err.value) and "labelled=False" in str(err.value)
    gta5.image_files["00003"].unlink()
    with pytest.raises(ValueError, match=r"1 of 4 labels have no image.*labels/00003\.png"):
        GTA5(gta5.root)
    synthia.label_files["0000002"].unlink()
    with pytest.raises(ValueError, match=r"1 of 3 images have no label.*RGB/0000002\.png"):
        SYNTHIA(synthia.root)


def test_corrupt_pngs_name_the_file(cityscapes, gta5, synthia):
    truncate(cityscapes.image_files[cityscapes.names[1]])
    ds = Cityscapes(cityscapes.root, "val")
    ds[0]  # the others still read
    with pytest.raises(
        ValueError, match=r"aachen_000001_000026_leftImg8bit\.png cannot be decoded"
    ):
        ds[1]
    truncate(cityscapes.label_files[cityscapes.names[2]])
    with pytest.raises(ValueError, match=r"bochum_000000_000019_gtFine_labelIds\.png cannot be"):
        ds[2]
    truncate(synthia.label_files["0000001"])
    with pytest.raises(ValueError, match=r"GT/LABELS/0000001\.png cannot be decoded"):
        SYNTHIA(synthia.root)[1]
    gta5.label_files["00004"].write_bytes(b"not a png")  # GTA5 reads headers when indexing
    with pytest.raises(ValueError, match=r"labels/00004\.png cannot be decoded"):
        GTA5(gta5.root)


def test_label_values_out_of_range_name_file_value_and_hint(cityscapes, gta5, synthia):
    name = cityscapes.names[0]
    trainids = expected_train_ids(cityscapes.labels[name], CITYSCAPES_TRAIN_IDS).astype(np.uint8)
    Image.fromarray(trainids).save(cityscapes.label_files[name])  # a trainIds PNG: 255 inside
    with pytest.raises(
        ValueError, match=r"aachen_000000_000019_gtFine_labelIds\.png holds the value 255"
    ) as err:
        Cityscapes(cityscapes.root, "val")[0]
    assert "*_gtFine_labelIds.png" in str(err.value)
    Image.fromarray(cityscapes.images[name]).save(cityscapes.label_files[name])  # a colour PNG
    with pytest.raises(ValueError, match="3-channel image, not a single-channel id PNG"):
        Cityscapes(cityscapes.root, "val")[0]

    label = Image.fromarray(np.full((24, 44), 34, np.uint8))
    label.putpalette([0] * 768)
    label.save(gta5.label_files["00001"])
    with pytest.raises(ValueError, match=r"00001\.png holds the value 34.*Cityscapes labelIds"):
        GTA5(gta5.root)[0]

    class_ids = synthia.labels["0000000"].copy()
    class_ids[3, 5] = 300
    write_png16(
        synthia.label_files["0000000"], np.stack([class_ids, class_ids * 0, class_ids * 0], -1)
    )
    with pytest.raises(ValueError, match=r"0000000\.png holds the value 300.*below 256"):
        SYNTHIA(synthia.root)[0]


def test_bad_arguments_are_refused(cityscapes):
    with pytest.raises(ValueError, match="label_size must be 'input' or 'native'"):
        Cityscapes(cityscapes.root, transform=SegmentationTransform(label_size="full"))
    with pytest.raises(ValueError, match="label_size='input' for training sets"):
        # val labels default to native
        Cityscapes(cityscapes.root, "val", transform=SegmentationTransform(train_augment=True))
    with pytest.raises(ValueError, match="size must be"):
        Cityscapes(cityscapes.root, transform=SegmentationTransform(size=(512,)))
    with pytest.raises(ValueError, match="scale_range"):
        SegmentationTransform(label_size="input", train_augment=True, scale_range=(2, 1))


def test_normalising_in_one_pass_equals_torchvisions_two_passes_for_every_byte_value():
    from torchvision.transforms.v2 import functional as TF

    every_value = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1)  # (3, 4, 256)
    expected = TF.normalize(TF.to_dtype(every_value, torch.float32, scale=True), IMAGENET_MEAN,
                            IMAGENET_STD)  # fmt: skip
    out = SegmentationTransform(size=None).normalise(every_value)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 256)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    channels_last = every_value.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # as decoded
    torch.testing.assert_close(SegmentationTransform(size=None).normalise(channels_last), expected,
                               rtol=0, atol=1e-6)  # fmt: skip
