"""configs/seg_demo.yaml through the real CLI on tiny settings: all three stages run, the table
is printed and saved, an overlay PNG per stage is written; and the config's evaluation scenes
use digit images that no adaptation scene contains."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from dam_lightning.cli import main

from .conftest import REPO

CONFIG = REPO / "configs" / "seg_demo.yaml"

TINY = [
    "--model.init_args.source_steps=2",
    "--model.init_args.net.init_args.width=0.25",
    "--model.init_args.discriminator_width=4",
    "--trainer.max_steps=4",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.source.init_args.digits.init_args.num_samples=40",
    "--data.source.init_args.num_scenes=16",
    "--data.target.init_args.num_scenes=16",
    "--data.target_val.init_args.num_scenes=6",
    # 32x32 scenes with 10-16 px digits keep the run to a few seconds on one core
    "--model.init_args.net.init_args.example_input_shape=[3, 32, 32]",
    *(
        f"--data.{role}.init_args.{key}"
        for role in ("source", "target", "target_val")
        for key in ("size=32", "digit_size=[10, 16]")
    ),
    "--data.batch_size=4",
    "--data.eval_batch_size=6",
]


@pytest.mark.slow
def test_the_segmentation_demo_runs_all_stages_and_writes_the_overlays(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIG), *TINY])
    out = capsys.readouterr().out
    assert "miou" in out and "worst_class_iou" in out
    [summary] = list((tmp_path / "runs" / "seg_demo").rglob("summary.json"))
    rows = json.loads(summary.read_text())
    assert list(rows) == ["source only", "after Gaussian matching", "after GAM"]
    for row in rows.values():
        assert {"pixel_acc", "class_acc", "miou", "worst_class_iou", "iou/background"} <= set(row)
    overlays = sorted(p.name for p in (summary.parent / "overlays").glob("*.png"))
    assert overlays == [
        "1_source_only.png", "2_after_gaussian_matching.png", "3_after_gam.png", "stages.png"
    ]  # fmt: skip
    with Image.open(summary.parent / "overlays" / "stages.png") as image:
        assert image.mode == "RGB" and image.height > image.width / 6 * 5 / 2


def test_the_evaluation_digits_never_appear_in_the_adaptation_scenes():
    from dam_lightning.data import DigitScenes, UCIDigits

    data = yaml.safe_load(CONFIG.read_text())["data"]
    digits = UCIDigits()
    built = {}
    for role in ("target", "target_val"):
        settings = {k: v for k, v in data[role]["init_args"].items() if k != "digits"}
        assert data[role]["init_args"]["digits"]["class_path"].endswith("UCIDigits")
        built[role] = DigitScenes(digits, **{**settings, "num_scenes": 300})
    assert built["target"].split == "adapt" and built["target_val"].split == "test"
    assert built["target"].digit_indices.isdisjoint(built["target_val"].digit_indices)
