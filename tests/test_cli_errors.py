"""The catalogue of bad inputs (docs/errors.md), through the real CLI: each ends the command with
one line, ``error: <message>``, that names the file or key and the value, and leaves no clutter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dam_lightning.cli import main

from .conftest import REPO

DEMO = str(REPO / "configs" / "demo.yaml")


def _demo(tmp_path: Path, *extra: str, command: str = "fit") -> list[str]:
    return [
        command, "--config", DEMO,
        "--trainer.accelerator=cpu", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
        "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=2",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--model.init_args.source_steps=2",
        "--data.source.init_args.num_samples=100", "--data.target=dam_lightning.data.SynDigits",
        "--data.target.num_samples=96", "--data.target.seed=1", "--data.batch_size=32", *extra,
    ]  # fmt: skip


def _error(args: list[str], capsys, code: int = 1) -> str:
    """Run the CLI, expect it to exit with ``code``; return the last line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_a_zero_batch_size_is_refused_before_wandb_starts_and_leaves_nothing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    line = _error(_demo(tmp_path, "--data.batch_size=0"), capsys)
    assert line == "error: data.batch_size must be a positive number of images, got 0"
    assert list(tmp_path.iterdir()) == []  # no run folder, no offline W&B run


def test_debug_shows_the_traceback_instead(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        main(_demo(tmp_path, "--data.batch_size=-4", "--debug"))
    monkeypatch.setenv("DAM_LIGHTNING_DEBUG", "1")
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        main(_demo(tmp_path, "--data.batch_size=-4"))


def _damaged_checkpoints(folder: Path) -> dict[str, Path]:
    good = folder / "good.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1000)}, "hyper_parameters": {}}, good)
    truncated, garbage = folder / "truncated.ckpt", folder / "garbage.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage.write_bytes(b"\x80\x02(not a pickle at all")
    return {"truncated": truncated, "garbage": garbage}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("where", ["--ckpt_path", "source_weights"])
def test_a_damaged_checkpoint_is_named_in_one_line(where, damage, tmp_path, capsys):
    path = _damaged_checkpoints(tmp_path)[damage]
    if where == "--ckpt_path":
        args = _demo(tmp_path, f"--ckpt_path={path}", command="validate")
    else:
        args = _demo(tmp_path, f"--model.init_args.source_weights={path}")
    line = _error(args, capsys)
    assert line.startswith(f"error: {where}: {path} (")
    assert "is not a readable checkpoint: it is truncated or corrupt" in line


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    line = _error(_demo(tmp_path, f"--ckpt_path={tmp_path / 'nope.ckpt'}", command="test"), capsys)
    assert line == (
        f"error: --ckpt_path: {tmp_path / 'nope.ckpt'} does not exist; pass the path of a "
        "checkpoint (.ckpt) or state dict (.pt) file"
    )


@pytest.mark.parametrize(
    "where, extra",
    [
        ("source training batch", ["--data.source=tests.cli_helpers.OneBasedDigits",
                                   "--data.source.num_samples=100"]),
        ("target_val batch", ["--data.target_val=tests.cli_helpers.OneBasedDigits",
                              "--data.target_val.num_samples=100"]),
    ],
    ids=["gam-source_steps", "validation"],
)  # fmt: skip
def test_labels_outside_the_classes_are_refused_with_the_bad_label(where, extra, tmp_path, capsys):
    line = _error(_demo(tmp_path, *extra), capsys)
    assert line.startswith(f"error: {where}: label 10 is outside 0..9 (num_classes=10)")


def test_labels_outside_the_classes_are_refused_by_source_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--config", str(REPO / "configs" / "mnist_usps_source.yaml"),
        "--data.source=tests.cli_helpers.OneBasedDigits", "--data.source.num_samples=64",
        "--data.target=dam_lightning.data.UCIDigits", "--data.source_val=null",
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--data.batch_size=32",
    ]  # fmt: skip
    line = _error(args, capsys)
    assert line.startswith("error: source training batch: label 10 is outside 0..9")
    assert not (tmp_path / "runs" / "mnist_usps_source").exists()  # failed before any result


def test_an_unknown_layer_is_its_own_message(tmp_path, capsys):
    line = _error(_demo(tmp_path, "--model.init_args.layers={fc9: 1.0}"), capsys)
    assert line.startswith("error: layers: LeNet has no layer named 'fc9'. Valid layer names:")
    assert "fc3" in line and "Union" not in line


def test_a_value_of_the_wrong_type_is_one_line_naming_the_key(tmp_path, capsys):
    line = _error(_demo(tmp_path, "--model.init_args.drift_weight=abc"), capsys, code=2)
    assert line == "error: model.drift_weight: Expected a <class 'float'>. Got value: abc"


def test_a_negative_weight_is_refused_at_construction(tmp_path, capsys):
    line = _error(_demo(tmp_path, "--model.init_args.adversarial_weight=-1"), capsys)
    assert line == "error: adversarial_weight must be a finite number >= 0, got -1.0"


@pytest.mark.slow
def test_a_nan_loss_stops_naming_loss_layer_and_step_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys
):
    args = _demo(tmp_path, "--trainer.callbacks+=tests.cli_helpers.PoisonTargetNetwork")
    line = _error(args, capsys)
    assert line.startswith(
        "error: the discriminator loss of layer fc3 (layer/fc3/loss_d) is nan at epoch 1, "
        "batch 0 (global step 2)"  # 2 source steps (stage 1 is epoch 0); stopped before D's
    )
    (last,) = tmp_path.rglob("last.ckpt")
    assert f"The last checkpoint written before it is {last}." in line
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert "TrainingStopped" in (last.parent.parent / "log.txt").read_text()  # traceback


@pytest.mark.slow
def test_nan_weights_are_never_written_as_a_checkpoint(tmp_path, capsys):
    args = _demo(tmp_path, "--trainer.callbacks+=tests.cli_helpers.PoisonBeforeCheckpoint")
    line = _error(args, capsys)
    assert "target_net.conv1.0.weight hold NaN or inf at epoch 0" in line
    assert "no checkpoint written. No checkpoint had been written yet." in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_missing_mnist_says_how_to_get_it_and_names_the_reduced_overlay(tmp_path, capsys):
    args = [
        "fit", "--config", str(REPO / "configs" / "mnist_usps_source.yaml"),
        f"--data.source.init_args.root={tmp_path}", "--data.source.init_args.download=false",
    ]  # fmt: skip
    line = _error(args, capsys)
    assert line.startswith(
        "error: MNIST train files train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
        f"are not in {tmp_path} or its MNIST/raw, raw (download is off)"
    )
    assert "(download is off)" in line and "download: true" in line, line
    assert len(line) - len(f"error: {tmp_path}") <= 300, line
    assert line.endswith("with test files only: --config configs/digits_reduced.yaml")


def test_a_segmentation_root_pointing_nowhere_is_one_line(tmp_path, capsys):
    args = [
        "fit", "--config", str(REPO / "configs" / "gta_source.yaml"),
        "--config", str(REPO / "tests" / "conf" / "seg_tiny.yaml"),
        f"--data.source.init_args.root={tmp_path / 'nowhere'}",
    ]  # fmt: skip
    line = _error(args, capsys)
    assert line.startswith(f"error: GTA5 root '{tmp_path / 'nowhere'}' is not a folder")


def test_plain_ddp_for_gam_is_refused_at_once(tmp_path, capsys):
    line = _error(_demo(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2"), capsys)
    assert line.startswith("error: trainer.strategy='ddp' cannot train GAMAdaptModule")
    assert "ddp_find_unused_parameters_true" in line
    assert list(tmp_path.iterdir()) == []


def test_fit_help_offers_this_librarys_datasets_and_networks(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 700  # 1,190 when every imported Dataset subclass was listed
    assert "dam_lightning.data.SynDigits" in text and "datapipes" not in text
    assert "torchvision.datasets" not in text
    with pytest.raises(SystemExit):
        main(["fit", "--config", DEMO, "--model.help", "GAMAdaptModule"])
    text = capsys.readouterr().out
    assert "dam_lightning.models.LeNet" in text and "torch.nn.Linear" not in text


def test_a_class_from_another_library_still_works_by_class_path(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", DEMO, "--data.target=torchvision.datasets.FakeData",
              "--data.target.init_args.size=10", "--print_config"])  # fmt: skip
    target = yaml.safe_load(capsys.readouterr().out)["data"]["target"]
    assert target["class_path"] == "torchvision.datasets.FakeData"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_target_item_of_the_wrong_kind_is_one_line_even_from_a_worker(workers, tmp_path, capsys):
    args = _demo(
        tmp_path, "--data.target=tests.cli_helpers.DictItems", "--data.target.num_samples=64",
        "--data.target_val=dam_lightning.data.SynDigits", "--data.target_val.num_samples=64",
        f"--data.num_workers={workers}",
    )  # fmt: skip
    line = _error(args, capsys)
    assert line == (
        "error: DictItems(split='all', size=64) returned a dict item; a domain-adaptation "
        "dataset must return an image tensor or an (image, label) tuple or list"
    )


# ---- first errors that point at the fix (issue 22) -----------------------------------------------

GTA = str(REPO / "configs" / "gta.yaml")
SEG_TINY = str(REPO / "tests" / "conf" / "seg_tiny.yaml")


def _gta(roots: Path, *extra: str, command: str = "fit", config: str = GTA) -> list[str]:
    return [
        command, "--config", config, "--config", SEG_TINY, "--trainer.logger=false",
        f"--data.source.init_args.root={roots / 'gta5'}",
        f"--data.target.init_args.root={roots / 'cityscapes'}",
        f"--data.target_val.init_args.root={roots / 'cityscapes'}", *extra,
    ]  # fmt: skip


@pytest.fixture
def gta_roots(tmp_path) -> Path:
    """A GTA5 tree of 3 pairs (one label a few pixels off its image's size) and Cityscapes."""
    from .segmentation_fixtures import write_cityscapes, write_gta5

    write_gta5(tmp_path / "gta5", n=3)
    write_cityscapes(tmp_path / "cityscapes", "train", per_city=1)
    write_cityscapes(tmp_path / "cityscapes", "val", per_city=1)
    return tmp_path


def _lenet_checkpoint(path: Path, network: str | None) -> Path:
    """A demo (LeNet) checkpoint as GAMAdaptModule writes it; ``network`` is what its RunFolder
    recorded (None: a checkpoint from before RunFolder recorded it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {"target_net.fc3.weight": torch.zeros(2, 2)},
            "hyper_parameters": {"_class_path": "dam_lightning.modules.GAMAdaptModule",
                                 "layers": {"fc3": 0.1, "fc4": 1.0}},
            "callbacks": {"RunFolder": {"path": str(path.parent.parent), "network": network}},
        },
        path,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "run-config"])
def test_a_checkpoint_of_another_network_says_which_and_the_fix(recorded, tmp_path, capsys):
    ckpt = tmp_path / "runs" / "demo" / "run1" / "checkpoints" / "last.ckpt"
    _lenet_checkpoint(ckpt, "dam_lightning.models.LeNet" if recorded else None)
    if not recorded:  # older checkpoints: the network comes from the run's config.yaml
        (ckpt.parent.parent / "config.yaml").write_text(
            "model:\n  init_args:\n    net:\n      class_path: dam_lightning.models.LeNet\n"
        )
    line = _error(_gta(tmp_path, f"--ckpt_path={ckpt}", command="validate"), capsys)
    assert line == (
        f"error: --ckpt_path: {ckpt} holds LeNet weights, but the config ({GTA}, {SEG_TINY}) "
        "builds ERFNet: pass a checkpoint written with this config, or use the config that "
        f"trained the checkpoint (its run's config: {ckpt.parent.parent}/config.yaml)"
    )
    assert list(tmp_path.glob("runs/demo/run1/validate-*")) == []  # refused before any folder


def test_a_setting_from_a_checkpoint_of_unknown_network_is_blamed_on_it(gta_roots, capsys):
    ckpt = _lenet_checkpoint(gta_roots / "old" / "checkpoints" / "old.ckpt", network=None)
    line = _error(_gta(gta_roots, f"--ckpt_path={ckpt}", command="validate"), capsys)
    assert line.startswith("error: layers: ERFNet has no layer named 'fc3'. Valid layer names:")
    assert line.endswith(
        f"(layers came from --ckpt_path {ckpt}, not from the config: was that checkpoint "
        "written with this config?)"
    )


def test_a_long_list_in_an_error_is_cut_with_a_count(gta_roots, capsys):
    line = _error(_gta(gta_roots, "--model.init_args.layers={fc9: 1.0}"), capsys)
    assert line.startswith(
        "error: layers: ERFNet has no layer named 'fc9'. Valid layer names: encoder, "
        "encoder.initial_block, encoder.initial_block.conv, encoder.initial_block.pool, "
        "encoder.initial_block.bn, ... ("
    )
    assert line.endswith(" more), output (the network's output)")
    assert len(line) < 300


def test_a_misspelt_key_on_the_command_line_gets_did_you_mean(tmp_path, capsys):
    line = _error(_demo(tmp_path, "--model.init_args.drift_wieght=1.0"), capsys, code=2)
    assert line == (
        "error: model: Option 'drift_wieght' is not accepted (did you mean 'drift_weight'?)"
    )
    line = _error(_demo(tmp_path, "--data.batch_sise=3"), capsys, code=2)
    assert line.endswith("(did you mean 'data.batch_size'?)")


def test_a_misspelt_key_in_an_overlay_names_the_overlay(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  init_args:\n    drift_wieght: 1.0\n")
    line = _error(_demo(tmp_path, "--config", str(overlay)), capsys, code=2)
    assert line == (
        "error: model: Option 'drift_wieght' is not accepted "
        f"(did you mean 'drift_weight'?; in {overlay})"
    )
    overlay.write_text("trainer:\n  max_step: 3\n")
    line = _error(_demo(tmp_path, "--config", str(overlay)), capsys, code=2)
    assert line == (
        "error: Subcommand 'fit' does not accept option 'trainer.max_step' "
        f"(did you mean 'trainer.max_steps'?; in {overlay})"
    )


@pytest.mark.parametrize(
    "option, hint",
    [
        ("--data.source.init_args.size=[512, 1024]", "did you mean 'transform.size'?"),  # moved
        ("--data.source.init_args.transform.sise=[512, 1024]", "did you mean 'transform.size'?"),
        ("--model.init_args.net.init_args.widht=0.5", "did you mean 'width'?"),  # ERFNet's
        ("--data.source.init_args.colour=1",
         "GTA5 accepts: labelled, root, size_mismatch, split_file, transform"),
    ],
    ids=["moved", "nested", "network", "no-close-match"],
)  # fmt: skip
def test_a_key_not_accepted_by_a_class_gets_that_classs_keys(option, hint, capsys):
    line = _error(["fit", "--config", GTA, option], capsys, code=2)
    assert line.endswith(f"({hint})"), line


def test_missing_segmentation_data_points_at_the_datasets_doc(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's data/gta5 does not exist here
    line = _error(["fit", "--config", GTA, "--trainer.logger=false"], capsys)
    assert line.startswith("error: GTA5 root 'data/gta5' is not a folder.")
    assert line.endswith("(where to get it: docs/datasets.md, section 'Segmentation')")
    assert "## Segmentation" in (REPO / "docs" / "datasets.md").read_text()


def test_a_size_written_as_text_shows_the_accepted_form(capsys):
    args = ["fit", "--config", GTA, "--data.source.init_args.transform.size=512x1024"]
    line = _error(args, capsys, code=2)
    assert line == (
        "error: data.source.transform.size: expected a list such as [512, 1024], got "
        "'512x1024': in a config write [512, 1024], on the command line "
        "--data.source.init_args.transform.size '[512, 1024]'"
    )


def test_a_size_mismatch_names_the_option_the_user_types(gta_roots, capsys):
    config = str(REPO / "configs" / "gta_source.yaml")
    args = _gta(gta_roots, "--data.source.init_args.size_mismatch=error", config=config)
    line = _error(args, capsys)
    assert "1 of 3 pairs differ in size" in line
    assert line.endswith(
        "pass --data.source.init_args.size_mismatch resize to resize such labels with nearest "
        "neighbour, or --data.source.init_args.size_mismatch skip to drop those pairs"
    )


def test_a_missing_test_file_under_the_reduced_protocol_does_not_recommend_it(tmp_path, capsys):
    """The reduced overlay reads only test files: a missing one must not be told to add it."""
    args = [
        "fit", "--config", str(REPO / "configs" / "mnist_usps_source.yaml"),
        "--config", str(REPO / "configs" / "digits_reduced.yaml"),
        f"--data.source.init_args.root={tmp_path}", "--data.source.init_args.download=false",
    ]  # fmt: skip
    line = _error(args, capsys)
    assert line.startswith("error: MNIST test files") and "digits_reduced" not in line, line
