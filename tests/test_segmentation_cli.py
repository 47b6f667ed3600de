"""The segmentation pipeline through the real CLI, on fixture datasets in the native formats:
stage 1 (gta_source.yaml), stages 2 + 3 (gta.yaml) reading stage 1's checkpoint, validate, and
predict writing PNGs that decode back to the predicted ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dam_lightning.cli import main
from dam_lightning.data.labels import CITYSCAPES_ID_TO_TRAIN_ID

from .conftest import REPO
from .segmentation_fixtures import write_cityscapes, write_gta5, write_synthia

TINY = str(REPO / "tests" / "conf" / "seg_tiny.yaml")


@pytest.fixture
def seg_roots(tmp_path, monkeypatch):
    """GTA5, SYNTHIA and Cityscapes (train + val, two cities) fixture trees; cwd = tmp_path, so
    the configs' relative run folders (runs/gta_source/source.ckpt) land there."""
    write_gta5(tmp_path / "gta5", n=6, size=(24, 44))
    write_synthia(tmp_path / "synthia", n=4, size=(24, 40))
    write_cityscapes(tmp_path / "cityscapes", "train", per_city=2, size=(32, 64))
    write_cityscapes(tmp_path / "cityscapes", "val", per_city=1, size=(64, 128), seed=1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _args(command: str, config: str, roots: Path, source: str = "gta5", *extra: str) -> list:
    return [
        command,
        "--config", str(REPO / "configs" / config),
        "--config", TINY,
        f"--data.source.init_args.root={roots / source}",
        f"--data.target.init_args.root={roots / 'cityscapes'}",
        f"--data.target_val.init_args.root={roots / 'cityscapes'}",
        *extra,
    ]  # fmt: skip


def _only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.slow
def test_two_stages_validate_and_predict_through_the_cli(seg_roots, capsys):
    main(_args("fit", "gta_source.yaml", seg_roots))
    source_ckpt = seg_roots / "runs" / "gta_source" / "source.ckpt"
    assert source_ckpt.is_file()

    main(_args("fit", "gta.yaml", seg_roots, "gta5", "--model.init_args.discriminator_width=8"))
    out = capsys.readouterr().out
    assert "mIoU" in out or "miou" in out
    summary_file = _only(list((seg_roots / "runs").rglob("summary.json")))
    summary = json.loads(summary_file.read_text())
    assert list(summary) == ["source only", "after Gaussian matching", "after GAM"]
    for row in summary.values():
        assert 0.0 <= row["pixel_acc"] <= 1.0
        assert "iou/road" in row and "miou" in row
    last = summary_file.parent / "checkpoints" / "last.ckpt"

    main(_args("validate", "gta.yaml", seg_roots, "gta5", f"--ckpt_path={last}"))
    out = capsys.readouterr().out
    assert "val/target/miou" in out and "val/target/iou/road" in out

    main(_args("predict", "gta.yaml", seg_roots, "gta5", f"--ckpt_path={last}"))
    out = capsys.readouterr().out
    assert "Predictions:" in out
    label_pngs = sorted((seg_roots / "runs").rglob("labelIds/*/*.png"))
    assert [p.parent.name for p in label_pngs] == ["aachen", "bochum"]
    assert label_pngs[0].name == "aachen_000000_000019.png"
    ids = np.asarray(Image.open(label_pngs[0]))
    assert ids.shape == (64, 128)  # the val label's resolution, not the network's 32x64
    train_ids = CITYSCAPES_ID_TO_TRAIN_ID[torch.from_numpy(ids.astype(np.int64))]
    assert int(train_ids.max()) < 19  # every written labelId is an evaluated class
    assert _only(list((seg_roots / "runs").rglob("colour/aachen/*.png"))).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("overlay", ["adda.yaml", "gaussian_only.yaml"])
def test_an_ablation_overlay_runs_on_synthia(seg_roots, overlay, capsys):
    main(_args("fit", "synthia_source.yaml", seg_roots, "synthia"))
    main(
        _args(
            "fit", "synthia.yaml", seg_roots, "synthia",
            "--config", str(REPO / "configs" / "ablations" / overlay),
            "--model.init_args.discriminator_width=8",
        )
    )  # fmt: skip
    summary = json.loads(_only(list((seg_roots / "runs").rglob("summary.json"))).read_text())
    final = list(summary)[-1]
    assert {"miou_16", "miou_13", "miou_16_subset_only", "miou_13_subset_only"} <= set(
        summary[final]
    )
    table = _only(list((seg_roots / "runs").rglob("summary.md"))).read_text()
    assert "miou_16_subset_only" in table  # both conventions in the printed table


@pytest.mark.slow
def test_a_torchvision_segmentation_model_trains_as_the_source_network(seg_roots):
    main(
        _args(
            "fit", "gta_source.yaml", seg_roots, "gta5",
            "--model.init_args.net=dam_lightning.models.TorchvisionSegmentation",
            "--model.init_args.net.init_args.arch=lraspp_mobilenet_v3_large",
            "--trainer.max_steps=2",
        )
    )  # fmt: skip
    assert (seg_roots / "runs" / "gta_source" / "source.ckpt").is_file()


def test_every_ablation_overlay_parses_on_the_digits_and_segmentation_configs(capsys):
    import yaml

    for base in ("gta.yaml", "mnist_usps.yaml"):
        for overlay in sorted((REPO / "configs" / "ablations").glob("*.yaml")):
            with pytest.raises(SystemExit):
                main(["fit", "--config", str(REPO / "configs" / base), "--config", str(overlay),
                      "--print_config"])  # fmt: skip
            model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
            if overlay.stem in ("adda", "adda_drift"):
                assert model["layers"] == {"output": 1.0}
            if overlay.stem in ("adda", "gam_no_drift", "gaussian_only"):
                assert model["drift_weight"] == 0.0


@pytest.mark.slow
def test_diagnose_through_the_cli_writes_the_table_the_json_and_both_figures(seg_roots, capsys):
    main(_args("fit", "gta_source.yaml", seg_roots))
    source_ckpt = seg_roots / "runs" / "gta_source" / "source.ckpt"
    main(_args("diagnose", "gta.yaml", seg_roots, "gta5", f"--ckpt_path={source_ckpt}",
               "--calibration_batches=2"))  # fmt: skip
    out = capsys.readouterr().out
    assert "A-dist GM |" in out and "do not pick" in out  # the gaps, and what they are for
    assert "layers:" not in out and "recommend" not in out.lower()  # no layer recommendation
    folder = _only(list((seg_roots / "runs").rglob("diagnose.md"))).parent
    assert folder.name.startswith("diagnose-")
    rows = json.loads((folder / "diagnose.json").read_text())
    assert rows["layers"] and "recommendation" not in rows  # one entry per analysed layer
    for figure in ("gap_by_layer.png", "histograms.png"):
        assert Image.open(folder / figure).size[0] > 100


def test_diagnose_without_a_source_network_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["diagnose", "--config", str(REPO / "configs" / "demo.yaml"),
              "--trainer.accelerator=cpu"])  # fmt: skip
    assert exit_info.value.code == 1
    assert "error: diagnose needs a trained source network" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["size", "train_augment", "crop_size"])
def test_a_transform_setting_outside_transform_is_an_unknown_key_naming_it(key, tmp_path, capsys):
    """The transform settings moved into ``init_args.transform``; a config that still sets one
    beside ``root`` fails with jsonargparse's unknown-key error, in one line naming the key and
    its new place."""
    old = tmp_path / "old.yaml"
    old.write_text(f"data:\n  source:\n    init_args:\n      {key}: null\n")
    args = ["fit", "--config", str(REPO / "configs" / "gta_source.yaml"), "--config", str(old),
            "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: data.source: Option '{key}' is not accepted"), lines
    assert f"did you mean 'transform.{key}'" in lines[-1], lines[-1]  # where the key went
    assert not any("Traceback" in line for line in lines)
