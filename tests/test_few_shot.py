"""Few-shot fine-tuning on the target (the paper's Fig. 6): FewShot chooses N labelled images,
the data module serves only those, SourceModule(init_weights=...) starts from a trained network
(once: a resumed fit keeps its own weights), and configs/few_shot.yaml fine-tunes through the CLI
without touching the published source network."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset, Subset

from dam_lightning.cli import main
from dam_lightning.data import DigitScenes, DomainAdaptationDataModule, FewShot, SynDigits
from dam_lightning.data.attributes import dataset_info
from dam_lightning.data.labels import DatasetInfo
from dam_lightning.models import ERFNet, LeNet
from dam_lightning.modules import GAMAdaptModule, SourceModule

from .conftest import REPO, quiet_trainer
from .segmentation_fixtures import write_cityscapes, write_gta5
from .test_cli_runs import OFFLINE_DIGITS, STAMP

FEW_SHOT = str(REPO / "configs" / "few_shot.yaml")
SOURCE_CONFIGS = ["mnist_usps_source", "usps_mnist_source", "gta_source", "synthia_source",
                  "seg_demo_source"]  # fmt: skip


@pytest.fixture(scope="module")
def digits():
    """A labelled source and a labelled target set (items are fixed tensors)."""
    return SynDigits(120, seed=0), SynDigits(60, seed=1)


def _key(x: torch.Tensor) -> bytes:
    return x.numpy().tobytes()


# ---- FewShot ---------------------------------------------------------------------------------


def test_few_shot_picks_n_distinct_images_by_seed(digits):
    _, target = digits
    few = FewShot(target, 7, seed=0)
    assert len(few.indices) == len(set(few.indices)) == 7
    assert few.indices == FewShot(target, 7, seed=0).indices
    assert set(few.indices) != set(FewShot(target, 7, seed=1).indices)
    assert set(few.indices) < set(FewShot(target, 10, seed=0).indices)  # nested over N
    for i in range(7):
        x, y = few[i]
        assert torch.equal(x, target[few.indices[i]][0]) and y == target[few.indices[i]][1]


def test_few_shot_repeats_its_images_to_length(digits):
    _, target = digits
    assert len(FewShot(target, 7)) == len(target)  # an epoch as long as the full set's
    few = FewShot(target, 7, seed=3, length=20)
    assert len(few) == 20
    served = Counter(_key(few[i][0]) for i in range(len(few)))
    assert served.keys() == {_key(target[i][0]) for i in few.indices}
    assert sorted(served.values()) == [2] + [3] * 6  # 20 items over 7 images
    with pytest.raises(IndexError):
        few[20]


class _Scenes(Dataset):
    """A stand-in segmentation set with the metadata SegmentationDataset has, and an eval view."""

    info = DatasetInfo("segmentation", 2, ("a", "b"), ((0, 0, 0), (9, 9, 9)))
    labelled = True

    def __init__(self, augment: bool = True):
        self.augment = augment
        self.labels = torch.arange(10) % 2

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.full((3, 2, 2), float(i)), torch.zeros(2, 2, dtype=torch.long)

    def eval_view(self):
        return _Scenes(augment=False)


def test_few_shot_passes_the_dataset_metadata_through_but_not_per_item_attributes(digits):
    few = FewShot(_Scenes(), 3, seed=0)
    assert (few.task, few.classes, few.num_classes, few.palette) == (
        "segmentation", ("a", "b"), 2, ((0, 0, 0), (9, 9, 9)),
    )  # fmt: skip
    view = few.eval_view()
    assert not view.dataset.augment and view.indices == few.indices and len(view) == len(few)
    assert not hasattr(few, "labels")  # indexed like the wrapped set: never passed on
    subset = Subset(digits[1], range(30))
    subset.num_classes = 10
    plain = FewShot(subset, 3)
    assert dataset_info(plain).task == "classification"
    assert plain.num_classes == 10 and not hasattr(plain, "eval_view")
    assert dataset_info(FewShot(DigitScenes(SynDigits(20), num_scenes=4), 2)).task == (
        "segmentation"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_images": 0}, ValueError, r"num_images=0 but the dataset has 60 images.*1 <= "),
        ({"num_images": 61}, ValueError, r"num_images=61 but the dataset has 60 images"),
        ({"num_images": True}, TypeError, r"whole number of images, got True"),
        ({"num_images": 5, "length": 4}, ValueError, r"length=4 is shorter than num_images=5"),
    ],
)
def test_few_shot_refuses_impossible_counts(digits, kwargs, error, message):
    with pytest.raises(error, match=message):
        FewShot(digits[1], **kwargs)


def test_few_shot_refuses_an_unlabelled_set():
    unlabelled = _Scenes()
    unlabelled.labelled = False
    with pytest.raises(ValueError, match=r"needs labelled images.*labelled true"):
        FewShot(unlabelled, 2)


# ---- the data module ---------------------------------------------------------------------------


def test_data_module_serves_only_the_few_shot_target_images_with_their_labels(digits):
    source, target = digits
    dm = DomainAdaptationDataModule(source, target, batch_size=16, few_shot=5, few_shot_seed=2)
    chosen = FewShot(target, 5, seed=2).indices
    labels = {_key(target[i][0]): int(target[i][1]) for i in chosen}
    served = Counter()
    for x, y in dm.source_dataloader():
        for image, label in zip(x, y, strict=True):
            assert labels[_key(image)] == int(label)  # one of the five, with its own label
            served[_key(image)] += 1
    assert served.keys() == labels.keys() and sum(served.values()) == 48  # 60 items, batches of 16
    assert dm.num_classes == 10 and dm.class_names == list(source.classes)  # from the source
    assert dm.val_dataloader()[0].dataset is target  # validation unchanged


def test_with_source_the_few_shot_images_fill_half_of_the_training_set(digits):
    source, target = digits
    dm = DomainAdaptationDataModule(source, target, batch_size=20, few_shot=5, few_shot_seed=2,
                                    few_shot_with_source=True)  # fmt: skip
    chosen = {_key(target[i][0]) for i in FewShot(target, 5, seed=2).indices}
    source_images = {_key(x) for x, _ in source}
    served = Counter()
    for x, _ in dm.source_dataloader():
        served.update(_key(image) for image in x)
    assert sum(served.values()) == 2 * len(source)  # the source set and 120 few-shot items
    assert sum(served[k] for k in chosen) == len(source)  # half of the items: the five
    assert set(served) == chosen | source_images  # every source image, and nothing else


def test_data_module_names_the_key_of_a_bad_few_shot_count(digits):
    with pytest.raises(ValueError, match=r"^data.few_shot: num_images=100 but .* 60 images"):
        DomainAdaptationDataModule(*digits, few_shot=100)


def test_few_shot_data_is_refused_for_an_adaptation_run(digits):
    dm = DomainAdaptationDataModule(*digits, batch_size=16, few_shot=5)
    module = GAMAdaptModule(LeNet, num_classes=10, source_steps=1)
    with pytest.raises(ValueError, match=r"data.few_shot fine-tunes a SourceModule.*GAMAdapt"):
        quiet_trainer(max_steps=2).fit(module, dm)


# ---- SourceModule(init_weights=...) ----------------------------------------------------------


def _trained_checkpoint(module, dm, path, steps: int = 2) -> str:
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(module, dm)
    trainer.save_checkpoint(path)
    return str(path)


def _start_weights(module, dm) -> dict:
    """The module's network weights right after on_fit_start (no training step)."""
    quiet_trainer(max_steps=0, max_epochs=1, limit_train_batches=0).fit(module, dm)
    return {k: v.clone() for k, v in module.net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_weights_from_a_source_checkpoint(digits, tmp_path, caplog):
    dm = DomainAdaptationDataModule(*digits, batch_size=16)
    source = SourceModule(LeNet, num_classes=10)
    ckpt = _trained_checkpoint(source, dm, tmp_path / "source.ckpt")
    module = SourceModule(LeNet, num_classes=10, init_weights=ckpt)
    with caplog.at_level(logging.INFO):
        start = _start_weights(module, dm)
    assert _same(start, source.net.state_dict())
    assert f"Initial weights of the network: {ckpt} (written " in caplog.text


def test_init_weights_from_a_gam_checkpoint_take_its_adapted_target_network(digits, tmp_path):
    dm = DomainAdaptationDataModule(*digits, batch_size=16)
    gam = GAMAdaptModule(LeNet, num_classes=10, source_steps=2)
    ckpt = _trained_checkpoint(gam, dm, tmp_path / "gam.ckpt", steps=4)
    assert not _same(gam.target_net.state_dict(), gam.source_net.state_dict())
    start = _start_weights(SourceModule(LeNet, num_classes=10, init_weights=ckpt), dm)
    assert _same(start, gam.target_net.state_dict())


def test_missing_init_weights_is_a_clear_error_and_none_warns_on_few_shot(digits, tmp_path):
    dm = DomainAdaptationDataModule(*digits, batch_size=16, few_shot=5)
    module = SourceModule(LeNet, num_classes=10, init_weights=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"^init_weights: .*nope.ckpt does not exist"):
        _start_weights(module, dm)
    torch.save(LeNet(5).state_dict(), tmp_path / "five.pt")
    module = SourceModule(LeNet, num_classes=10, init_weights=str(tmp_path / "five.pt"))
    with pytest.raises(ValueError, match=r"^init_weights: .*five.pt does not fit LeNet"):
        _start_weights(module, dm)
    with pytest.warns(UserWarning, match=r"5 labelled target images from a random init"):
        _start_weights(SourceModule(LeNet, num_classes=10), dm)


def _fine_tune(module, dm, root, max_epochs: int, ckpt_path=None):
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}")
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        limit_train_batches=2,
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[checkpoint],
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)


def test_a_resumed_fine_tune_continues_exactly_and_does_not_reload_init_weights(digits, tmp_path):
    dm = DomainAdaptationDataModule(*digits, batch_size=16, few_shot=5)
    init = tmp_path / "init.pt"
    torch.save(LeNet(10).state_dict(), init)
    straight = SourceModule(LeNet, num_classes=10, init_weights=str(init))
    _fine_tune(straight, dm, tmp_path / "straight", max_epochs=2)
    interrupted = SourceModule(LeNet, num_classes=10, init_weights=str(init))
    _fine_tune(interrupted, dm, tmp_path / "interrupted", max_epochs=1)
    resumed = SourceModule(LeNet, num_classes=10, init_weights=str(init))
    epoch0 = tmp_path / "interrupted" / "epoch=0.ckpt"
    _fine_tune(resumed, dm, tmp_path / "resumed", max_epochs=2, ckpt_path=epoch0)
    assert _same(resumed.state_dict(), straight.state_dict())

    restored = SourceModule.load_from_checkpoint(epoch0, net=LeNet)  # hparams hold init_weights
    assert restored.hparams.init_weights == str(init)
    start = _start_weights(restored, dm)  # a new fit of a restored module keeps its weights
    assert _same(start, interrupted.net.state_dict()) and not _same(start, torch.load(init))


def test_a_checkpoint_from_before_weights_initialised_still_loads(tmp_path):
    module = SourceModule(LeNet, num_classes=10)
    old = {k: v for k, v in module.state_dict().items() if k != "weights_initialised"}
    restored = SourceModule(LeNet, num_classes=10)
    checkpoint = {"state_dict": old}
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])  # strict
    assert bool(restored.weights_initialised)


# ---- configs/few_shot.yaml through the CLI ---------------------------------------------------


def _print_config(*configs: str, extra: tuple[str, ...] = ()) -> None:
    args = [a for c in configs for a in ("--config", c)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, *extra, "--print_config"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("name", SOURCE_CONFIGS)
def test_few_shot_overlay_parses_on_every_source_config(name, capsys):
    base = str(REPO / "configs" / f"{name}.yaml")
    _print_config(base, FEW_SHOT)
    config = yaml.safe_load(capsys.readouterr().out)
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert callbacks == [  # no PublishCheckpoint; a summary of the start and the end
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "dam_lightning.callbacks.AdaptationSummary",
    ]
    assert config["trainer"]["max_steps"] == 500
    assert config["trainer"]["logger"]["init_args"]["name"] == "few_shot"
    assert (config["data"]["few_shot"], config["data"]["few_shot_seed"]) == (10, 0)
    assert config["data"]["few_shot_with_source"] is True
    model = config["model"]["init_args"]
    assert model["optimizer"]["init_args"]["lr"] == pytest.approx(1e-4)
    assert model["scheduler"] is None and model["init_weights"] is None
    _print_config(base)  # and the base config alone keeps its own callbacks
    base_callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert any(c["class_path"].endswith("PublishCheckpoint") for c in base_callbacks)


def test_few_shot_overlay_keeps_the_base_weight_decay_and_takes_flags(capsys):
    _print_config(
        str(REPO / "configs" / "mnist_usps_source.yaml"),
        str(REPO / "configs" / "digits_reduced.yaml"),
        FEW_SHOT,
        extra=("--data.few_shot=35", "--data.few_shot_seed=3",
               "--model.init_args.init_weights=runs/x/last.ckpt"),
    )  # fmt: skip
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["optimizer"]["init_args"]["weight_decay"] == 2.5e-5
    assert config["model"]["init_args"]["init_weights"] == "runs/x/last.ckpt"
    assert (config["data"]["few_shot"], config["data"]["few_shot_seed"]) == (35, 3)
    assert config["data"]["target"]["init_args"]["split"] == "test"


@pytest.mark.slow
def test_a_few_shot_fine_tune_runs_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' runs/... paths land here
    init = tmp_path / "adapted.pt"
    torch.save(LeNet(10).state_dict(), init)
    main(["fit", "--config", str(REPO / "configs" / "mnist_usps_source.yaml"),
          "--config", FEW_SHOT, *OFFLINE_DIGITS, "--trainer.max_steps=4",
          "--trainer.val_check_interval=2", f"--model.init_args.init_weights={init}",
          "--data.few_shot=5"])  # fmt: skip
    out = capsys.readouterr().out
    folder = re.search(f"Run folder: (runs/few_shot/{STAMP})", out).group(1)
    last = tmp_path / folder / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert not (tmp_path / "runs" / "mnist_usps_source").exists()  # nothing published
    assert f"Initial weights of the network: {init}" in (tmp_path / folder / "log.txt").read_text()
    blob = torch.load(last, weights_only=False)
    assert blob["global_step"] == 4
    tuned = {k.removeprefix("net."): v for k, v in blob["state_dict"].items() if k[:4] == "net."}
    assert not _same(tuned, torch.load(init))  # it trained from the given weights
    rows = json.loads((tmp_path / folder / "summary.json").read_text())
    assert list(rows) == ["starting network", "after fine-tuning"]  # both on target_val


@pytest.mark.slow
def test_a_segmentation_fine_tune_needs_and_uses_labelled_cityscapes_train(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_gta5(tmp_path / "gta5", n=4, size=(24, 44))
    write_cityscapes(tmp_path / "cityscapes", "train", per_city=2, size=(32, 64))
    write_cityscapes(tmp_path / "cityscapes", "val", per_city=1, size=(64, 128), seed=1)
    init = tmp_path / "adapted.pt"
    torch.save(ERFNet(19, width=0.25, dropout=0.0).state_dict(), init)
    args = ["fit", "--config", str(REPO / "configs" / "gta_source.yaml"), "--config", FEW_SHOT,
            "--config", str(REPO / "tests" / "conf" / "seg_tiny.yaml"),
            f"--data.source.init_args.root={tmp_path / 'gta5'}",
            f"--data.target.init_args.root={tmp_path / 'cityscapes'}",
            f"--data.target_val.init_args.root={tmp_path / 'cityscapes'}",
            f"--model.init_args.init_weights={init}", "--data.few_shot=2"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(args)  # gta_source.yaml reads Cityscapes train without its labels
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: data.few_shot: FewShot needs labelled images, but Cityscapes")
    assert error.endswith("--data.target.init_args.labelled true)")

    main([*args, "--data.target.init_args.labelled=true"])
    folder = re.search(f"Run folder: (runs/few_shot/{STAMP})", capsys.readouterr().out).group(1)
    assert (tmp_path / folder / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs" / "gta_source").exists()


@pytest.mark.parametrize(
    ("configs", "flags", "message"),
    [
        (["mnist_usps_source.yaml", "few_shot.yaml"], ["--data.few_shot=1000"],
         "error: data.few_shot: num_images=1000 but the dataset has 96 images: choose 1 <= "),
        (["mnist_usps_source.yaml", "few_shot.yaml"], ["--model.init_args.init_weights=no.ckpt"],
         "error: init_weights: no.ckpt does not exist; pass the checkpoint of a finished run"),
        (["mnist_usps.yaml"], ["--data.few_shot=5"],  # few_shot.yaml itself does not parse there
         "error: data.few_shot fine-tunes a SourceModule on 5 labelled target images; "
         "GAMAdaptModule trains"),
    ],
    ids=["too_many_images", "missing_init_weights", "gam_config"],
)  # fmt: skip
def test_few_shot_errors_through_the_cli(configs, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for c in configs for a in ("--config", str(REPO / "configs" / c))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, *OFFLINE_DIGITS, "--trainer.max_steps=2", *flags])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert list(tmp_path.rglob("*.ckpt")) == []


def test_validate_without_a_checkpoint_scores_the_init_weights_network(tmp_path):
    """`validate` with init_weights and no --ckpt_path must score those weights, not a random
    initialisation."""
    from dam_lightning.data import DomainAdaptationDataModule, SynDigits
    from dam_lightning.models import LeNet
    from dam_lightning.modules import SourceModule

    from .conftest import quiet_trainer

    torch.manual_seed(0)
    trained = LeNet(10)
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    module = SourceModule(LeNet, num_classes=10, init_weights=str(path))
    data = DomainAdaptationDataModule(SynDigits(32, seed=0), SynDigits(32, seed=1), batch_size=16)
    quiet_trainer(default_root_dir=tmp_path, limit_val_batches=1.0).validate(
        module, datamodule=data
    )
    for name, value in module.net.state_dict().items():
        assert torch.equal(value, trained.state_dict()[name]), name
