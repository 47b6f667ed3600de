"""Weights files are read in one place, ``dam_lightning.weights``, as weights only: a file whose
pickle would run code (here: create a marker file) is refused by every entry point that takes a
file, unrun, with a message that says it holds Python objects besides weights; plain state dicts
and the library's own Lightning checkpoints load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from dam_lightning.cli import main
from dam_lightning.data import DomainAdaptationDataModule
from dam_lightning.data.digits import SynDigits
from dam_lightning.models import ERFNet, LeNet, TorchvisionSegmentation
from dam_lightning.modules import GAMAdaptModule, SourceModule
from dam_lightning.trainer import DamTrainer
from dam_lightning.weights import (
    UnsafeWeightsFileError,
    WeightsFileError,
    load_network_weights,
    read_weights_file,
)

from .conftest import quiet_trainer
from .test_cli_errors import _demo, _error

pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTS = "holds Python objects besides weights (io.open): not loaded, nothing in it"


class _CreatesAFile:
    """Unpickled, this object is ``open(marker, "w")``: the file appears on disk."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint-shaped file whose pickle creates ``marker``, marker): it holds real
    weights too, so only the Python object in it can make a loader refuse it."""
    path, marker = tmp_path / "evil.ckpt", tmp_path / "MARKER"
    state = {f"net.{k}": v for k, v in LeNet(10).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"x": _CreatesAFile(marker)}}, path)
    assert not marker.exists()
    return path, marker


def _refused(err: BaseException, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the file's pickle ran"
    message = str(err)
    assert f"{path} {OBJECTS} was executed" in message, message
    assert "weights_only=False)['state_dict']" in message  # how to convert a trusted file
    assert "\n" not in message


def test_the_file_is_really_malicious(malicious):
    """The control: an unrestricted unpickler does create the marker."""
    path, marker = malicious
    torch.load(path, weights_only=False)  # only here, in a test, to prove the fixture
    assert marker.exists()


def test_read_weights_file_refuses_it_unrun(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeWeightsFileError) as info:
        read_weights_file(path, "source_weights")
    assert str(info.value).startswith(f"source_weights: {path} holds Python objects")
    _refused(info.value, path, marker)
    assert isinstance(info.value, ValueError)  # the CLI shows it as one line


def test_load_network_weights_refuses_it_unrun(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeWeightsFileError) as info:
        load_network_weights(LeNet(10), str(path), setting="init_weights")
    assert str(info.value).startswith("init_weights: ")
    _refused(info.value, path, marker)


def test_erfnet_weights_refuse_it_unrun(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeWeightsFileError) as info:
        ERFNet(4, encoder_only=True, width=0.25, weights=str(path))
    assert str(info.value).startswith("weights: ")  # what the user wrote
    _refused(info.value, path, marker)


@pytest.mark.parametrize("argument", ["weights", "backbone_weights"])
def test_torchvision_weights_refuse_it_unrun(malicious, argument):
    path, marker = malicious
    with pytest.raises(UnsafeWeightsFileError) as info:
        TorchvisionSegmentation(4, **{argument: str(path)})
    assert str(info.value).startswith(f"{argument}: ")
    _refused(info.value, path, marker)


def _digits() -> DomainAdaptationDataModule:
    return DomainAdaptationDataModule(SynDigits(32, seed=0), SynDigits(32, seed=1), batch_size=16)


def test_diagnose_refuses_it_unrun(malicious, tmp_path):
    path, marker = malicious
    trainer = DamTrainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(UnsafeWeightsFileError) as info:
        trainer.diagnose(SourceModule(LeNet, num_classes=10), _digits(), ckpt_path=str(path))
    assert str(info.value).startswith("ckpt_path: ")
    _refused(info.value, path, marker)


def test_gam_source_weights_refuse_it_unrun(malicious):
    path, marker = malicious
    module = GAMAdaptModule(LeNet, num_classes=10, layers={"fc4": 1.0}, source_weights=str(path))
    with pytest.raises(UnsafeWeightsFileError) as info:
        quiet_trainer(max_steps=1).fit(module, _digits())
    assert str(info.value).startswith("source_weights: ")
    _refused(info.value, path, marker)


def test_source_module_init_weights_refuse_it_unrun(malicious):
    path, marker = malicious
    module = SourceModule(LeNet, num_classes=10, init_weights=str(path))
    with pytest.raises(UnsafeWeightsFileError) as info:
        quiet_trainer(max_steps=1).fit(module, _digits())
    assert str(info.value).startswith("init_weights: ")
    _refused(info.value, path, marker)


def _cli_line(marker: Path, capsys, args: list[str]) -> str:
    line = _error(args, capsys)
    assert not marker.exists(), "the file's pickle ran"
    return line


@pytest.mark.parametrize("command", ["fit", "validate", "diagnose"])
def test_the_cli_ckpt_path_refuses_it_unrun_and_starts_nothing(malicious, tmp_path, capsys,
                                                               command):  # fmt: skip
    path, marker = malicious
    line = _cli_line(marker, capsys, _demo(tmp_path, f"--ckpt_path={path}", command=command))
    setting = "ckpt_path" if command == "diagnose" else "--ckpt_path"
    assert line.startswith(f"error: {setting}: {path} {OBJECTS} was executed"), line
    if command != "diagnose":  # refused while parsing: no run folder yet
        assert [p.name for p in tmp_path.iterdir()] == ["evil.ckpt"]


def test_the_cli_source_weights_refuse_it_unrun(malicious, tmp_path, capsys):
    path, marker = malicious
    args = _demo(tmp_path, f"--model.init_args.source_weights={path}")
    line = _cli_line(marker, capsys, args)
    assert line.startswith(f"error: source_weights: {path} {OBJECTS} was executed"), line


def test_the_cli_names_a_folder_given_as_ckpt_path(tmp_path, capsys):
    run = tmp_path / "runs" / "demo" / "2026-01-02_03-04-05"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    line = _error(_demo(tmp_path / "out", f"--ckpt_path={run}", command="validate"), capsys)
    assert line == (
        f"error: --ckpt_path: {run} is a folder, not a weights file; name the file, e.g. "
        f"{run / 'checkpoints' / 'last.ckpt'}"
    )


def test_the_cli_refuses_weights_only_false(tmp_path, capsys):
    line = _error(_demo(tmp_path, "--weights_only=false"), capsys)
    assert line.startswith("error: --weights_only false would let Lightning run code")
    assert list(tmp_path.iterdir()) == []


# ---- what is refused besides: missing, folder, damaged, not a dict --------------------------


def test_a_missing_file_or_a_folder_is_named_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^x: .*nope.pt does not exist; pass the path"):
        read_weights_file(tmp_path / "nope.pt", "x")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(IsADirectoryError) as info:
        read_weights_file(tmp_path / "run", "init_weights")
    assert str(info.value) == (
        f"init_weights: {tmp_path / 'run'} is a folder, not a weights file; name the file, "
        f"e.g. {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"
    )


def test_damaged_files_are_truncated_or_corrupt_not_python_objects(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1000)}}, good)
    damaged = {
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "garbage": b"\x80\x02(not a pickle at all",
        "empty": b"",
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsFileError) as info:
            read_weights_file(tmp_path / name, "source_weights")
        assert not isinstance(info.value, UnsafeWeightsFileError), name
        message = str(info.value)
        assert "is not a readable checkpoint: it is truncated or corrupt" in message, message
        assert "weights_only" not in message and "\n" not in message, message


def test_a_file_that_is_no_dict_is_refused(tmp_path):
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(WeightsFileError, match="holds a Tensor, not a checkpoint or state dict"):
        read_weights_file(tmp_path / "tensor.pt", "weights")


# ---- what loads: plain state dicts, the library's own checkpoints ---------------------------


def test_a_plain_state_dict_loads(tmp_path):
    trained = LeNet(10)
    torch.save(trained.state_dict(), tmp_path / "lenet.pt")
    net = LeNet(10)
    assert load_network_weights(net, str(tmp_path / "lenet.pt")).startswith("written ")
    for name, value in net.state_dict().items():
        assert torch.equal(value, trained.state_dict()[name]), name


@pytest.mark.parametrize("kind", ["source", "gam"])
def test_the_library_s_own_lightning_checkpoints_load_as_weights_only(kind, tmp_path):
    if kind == "source":
        module, network = SourceModule(LeNet, num_classes=10), "net"
    else:
        module = GAMAdaptModule(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=1)
        network = "target_net"
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, _digits())
    trainer.save_checkpoint(tmp_path / f"{kind}.ckpt")
    blob = read_weights_file(tmp_path / f"{kind}.ckpt", "init_weights")
    assert {"state_dict", "hyper_parameters", "optimizer_states", "loops"} <= set(blob)
    net = LeNet(10)
    load_network_weights(net, str(tmp_path / f"{kind}.ckpt"))
    expected = getattr(module, network).state_dict()
    for name, value in net.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_a_cli_run_s_checkpoint_loads_and_validates_as_weights_only(tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    """A checkpoint the CLI wrote (callback states, RunFolder's origin and all) reads as weights
    only, and ``validate --ckpt_path`` runs from it, Lightning told ``weights_only=True`` even
    where the environment would switch torch's default off."""
    main(_demo(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
               "--model.init_args.source_steps=1"))  # fmt: skip
    (last,) = tmp_path.rglob("last.ckpt")
    blob = read_weights_file(last, "--ckpt_path")
    assert blob["callbacks"] and os.path.isdir(blob["callbacks"]["RunFolder"]["path"])
    load_network_weights(LeNet(10), str(last))
    capsys.readouterr()

    asked = []
    resume_start = _CheckpointConnector.resume_start

    def spy(self, checkpoint_path=None, weights_only=None):
        if checkpoint_path:
            asked.append(weights_only)
        return resume_start(self, checkpoint_path, weights_only)

    monkeypatch.setattr(_CheckpointConnector, "resume_start", spy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    main(_demo(tmp_path, f"--ckpt_path={last}", command="validate"))
    assert "val/target/acc" in capsys.readouterr().out
    assert asked == [True]


# ---- the formats users have: the ERFNet authors' files (tests/test_erfnet.py has each one) ---


def test_init_and_source_weights_take_the_authors_file_and_name_their_setting(tmp_path):
    """``init_weights`` and ``source_weights`` go through ``load_network_weights``: the
    authors' DataParallel file loads, its 20 classes into 19 only with the option, and every
    message names the setting the user wrote."""
    released = {f"module.{k}": v for k, v in ERFNet(20, width=0.25).state_dict().items()}
    path = str(tmp_path / "erfnet_pretrained.pth")
    torch.save(released, path)
    for setting in ("init_weights", "source_weights"):
        with pytest.raises(ValueError, match=rf"^{setting}: .* has 20 classes, the network's "
                           "19: set skip_mismatched_classifier: true"):  # fmt: skip
            load_network_weights(ERFNet(19, width=0.25), path, setting=setting)
    net = ERFNet(19, width=0.25)
    origin = load_network_weights(net, path, setting="init_weights",
                                  skip_mismatched_classifier=True)  # fmt: skip
    assert origin.startswith("written ")
    assert "; skipped the classifier decoder.output_conv" in origin
    for name, value in net.state_dict().items():
        if not name.startswith("decoder.output_conv."):
            assert torch.equal(value, released[f"module.{name}"]), name
    full = ERFNet(20, width=0.25)
    assert load_network_weights(full, path).startswith("written ")
    assert all(torch.equal(v, released[f"module.{k}"]) for k, v in full.state_dict().items())


def test_source_module_fine_tunes_from_the_authors_20_class_file_with_the_option(tmp_path):
    """``SourceModule(init_weights=..., skip_mismatched_classifier=True)``: the config path to
    start a 19-class fine-tune from the authors' released 20-class ERFNet file."""
    from dam_lightning.modules import SourceModule

    released = {f"module.{k}": v for k, v in ERFNet(20, width=0.25).state_dict().items()}
    path = tmp_path / "erfnet_pretrained.pth"
    torch.save(released, path)

    def erfnet(num_classes):
        return ERFNet(num_classes, width=0.25)

    strict = SourceModule(erfnet, num_classes=19, task="segmentation", init_weights=str(path))
    with pytest.raises(ValueError, match="^init_weights: .*skip_mismatched_classifier"):
        strict.on_validation_start()
    module = SourceModule(erfnet, num_classes=19, task="segmentation", init_weights=str(path),
                          skip_mismatched_classifier=True)  # fmt: skip
    module.on_validation_start()  # validate without a checkpoint loads init_weights too
    encoder = {k: v for k, v in module.net.state_dict().items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(v, released[f"module.{k}"]) for k, v in encoder.items())
