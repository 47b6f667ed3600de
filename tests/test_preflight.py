"""``python -m dam_lightning preflight``: every stage timed, the run's cost estimated, on every
shipped config (synthetic stand-ins where the data is not on disk, at small sizes on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dam_lightning.callbacks import GaussianMatching
from dam_lightning.cli import main
from dam_lightning.data.synthetic import SyntheticLike, synthetic_item_shape

from .conftest import REPO
from .test_cli import CONFIGS, OVERLAYS

STAGE_KEYS = {
    "stage",
    "step_seconds",
    "peak_memory_mib",
    "loader_items_per_second",
    "step_items_per_second",
}
SMALL = "[32, 64]"
SEGMENTATION_FILES = ("GTA5", "SYNTHIA", "Cityscapes")


def _preflight(tmp_path: Path, config: Path, *extra: str) -> dict:
    main(
        [
            "preflight",
            "--config",
            str(config),
            "--steps",
            "1",
            f"--trainer.default_root_dir={tmp_path}",
            *_logger_dir(config, tmp_path),
            *extra,
        ]
    )
    (found,) = tmp_path.rglob("preflight.json")
    return json.loads(found.read_text())


def _logger_dir(config: Path, tmp_path: Path) -> list[str]:
    trainer = yaml.safe_load(config.read_text()).get("trainer", {})
    return [f"--trainer.logger.init_args.save_dir={tmp_path}"] if trainer.get("logger") else []


def _small(config: Path) -> list[str]:
    """CPU-sized overrides: every segmentation set at 32x64, the network sized for it, fp32, no
    loader workers (the measurement, not the numbers, is under test)."""
    settings = yaml.safe_load(config.read_text())
    flags = ["--trainer.precision=32-true", "--data.num_workers=0"]
    for role, entry in settings["data"].items():
        if isinstance(entry, dict) and entry["class_path"].endswith(SEGMENTATION_FILES):
            flags.append(f"--data.{role}.init_args.transform.size={SMALL}")
            if "crop_size" in entry["init_args"].get("transform", {}):
                flags.append(f"--data.{role}.init_args.transform.crop_size=[32, 32]")
    net = settings["model"]["init_args"]["net"]
    if net["class_path"].endswith(("ERFNet", "TorchvisionSegmentation")):
        flags.append("--model.init_args.net.init_args.example_input_shape=[3, 32, 64]")
    return flags


def test_preflight_times_every_stage_of_the_segmentation_demo(tmp_path, capsys):
    report = _preflight(tmp_path, REPO / "configs/seg_demo.yaml")
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["source", "gam", "gaussian_matching", "validation"]
    for stage in stages.values():
        assert STAGE_KEYS <= set(stage) and stage["step_seconds"] > 0
        assert stage["peak_memory_mib"] is None  # a CPU: not measured, never made up
    assert stages["source"]["loader_items_per_second"] > 0  # real data: the loader is timed
    # configs/seg_demo.yaml: 1,200 source batches, (1,800 - 1,200) / 2 GAM batches, matched
    # once; the summary scores its 500 val scenes (10 batches of 50) three times
    counts = {name: s["steps_in_run"] for name, s in stages.items()}
    assert counts == {"source": 1200, "gam": 300, "gaussian_matching": 1, "validation": 30}
    expected = sum(s["step_seconds"] * s["steps_in_run"] for s in stages.values())
    assert report["estimated_seconds"] == pytest.approx(expected)
    assert report["bottleneck"] in {
        "compute (source)",
        "loader (source)",
        "compute (gam)",
        "loader (gam)",
    }
    printed = capsys.readouterr().out
    assert "estimated run time" in printed and "gaussian_matching" in printed


@pytest.fixture
def one_calibration_batch(monkeypatch):
    """Gaussian matching on one calibration batch in one pass: the configs' 10 batches, layer
    by layer, cost a minute of CPU per config here, and its cost is not what this test checks."""
    init = GaussianMatching.__init__

    def one_batch(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.calibration_batches, self.mode = 1, "one_pass"

    monkeypatch.setattr(GaussianMatching, "__init__", one_batch)


# seg_demo.yaml: the test above, on its own data
SHIPPED = [c for c in CONFIGS if c.name not in OVERLAYS and c.name != "seg_demo.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED, ids=lambda path: path.name)
def test_preflight_runs_on_every_shipped_config(config, tmp_path, one_calibration_batch):
    report = _preflight(tmp_path, config, "--synthetic=true", *_small(config))
    names = [s["stage"] for s in report["stages"]]
    module = yaml.safe_load(config.read_text())["model"]["class_path"]
    expected = (
        {"source", "validation"} if module.endswith("SourceModule") else {"gam", "validation"}
    )
    assert expected <= set(names), names
    assert all(STAGE_KEYS <= set(s) and s["step_seconds"] > 0 for s in report["stages"])
    assert report["estimated_seconds"] is None or report["estimated_seconds"] > 0


def test_synthetic_stand_ins_have_the_shape_and_classes_of_the_real_set():
    shape = synthetic_item_shape("dam_lightning.data.Cityscapes", {"size": [16, 32]})
    image, label = SyntheticLike("dam_lightning.data.Cityscapes", shape, length=3)[2]
    assert image.shape == (3, 16, 32) and label.shape == (16, 32)
    assert label.dtype == torch.uint8 and 0 <= int(label.min()) <= int(label.max()) < 19
    crop = synthetic_item_shape(
        "dam_lightning.data.GTA5", {"train_augment": True, "crop_size": [8, 8]}
    )
    assert crop == (3, 8, 8)
    assert SyntheticLike("dam_lightning.data.MNIST", (1, 28, 28), labelled=False)[0].shape == (
        1,
        28,
        28,
    )


def test_preflight_without_the_data_names_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _preflight(tmp_path, REPO / "configs/gta.yaml", "--data.source.init_args.root=nowhere")
    assert "nowhere" in capsys.readouterr().err
