"""The torchvision adapter (``TorchvisionSegmentation``): each of torchvision's segmentation
models gives its logits tensor at the input size and never its auxiliary head's, the documented
taps (backbone layers by dotted name) are feature maps, weights come from local files only
(torchvision's, with or without ``aux_classifier.*``; ImageNet backbones), GAM sizes its
discriminators from a backbone tap, and the DeepLabV3 configs fit the adapter."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
import yaml

from dam_lightning.cli import main
from dam_lightning.matching.taps import ActivationTaps
from dam_lightning.models import TorchvisionSegmentation
from dam_lightning.models.torchvision import ARCHITECTURES
from dam_lightning.modules import GAMAdaptModule

from .conftest import REPO
from .segmentation_fixtures import write_cityscapes, write_gta5

WITH_AUX = [arch for arch in ARCHITECTURES if not arch.startswith("lraspp")]  # LR-ASPP has none


@pytest.fixture(autouse=True)
def seeded_on_one_thread(one_thread):
    """Seeded, on one thread (conftest's ``one_thread``: small tensors)."""
    torch.manual_seed(0)


def torchvision_model(arch: str, num_classes: int = 4, aux_loss: bool = False):
    builder = getattr(torchvision.models.segmentation, arch)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_torchvision_arch_returns_the_logits_tensor_at_the_input_size(arch):
    net = TorchvisionSegmentation(4, arch=arch).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 64, 64)
    assert getattr(net.model, "aux_classifier", None) is None
    assert not any("aux" in name for name, _ in net.named_modules())
    assert net.example_input_shape == (3, 512, 1024)


# (channels, width) of each documented tap for a 64x64 input: TorchvisionSegmentation's docstring
RESNET = {
    "model.backbone.layer1": (256, 16), "model.backbone.layer2": (512, 8),
    "model.backbone.layer3": (1024, 8), "model.backbone.layer4": (2048, 8),
    "model.classifier": (4, 8), "output": (4, 64),
}
TAPS = {
    "deeplabv3_resnet50": {**RESNET, "model.classifier.0": (256, 8),
                           "model.classifier.3": (256, 8)},
    "deeplabv3_resnet101": {**RESNET, "model.classifier.0": (256, 8),
                            "model.classifier.3": (256, 8), "model.backbone.layer3.22": (1024, 8)},
    "fcn_resnet50": {**RESNET, "model.classifier.2": (512, 8)},
    "fcn_resnet101": {**RESNET, "model.classifier.2": (512, 8)},
    "deeplabv3_mobilenet_v3_large": {
        "model.backbone.4": (40, 8), "model.backbone.16": (960, 4),
        "model.classifier.0": (256, 4), "model.classifier.3": (256, 4),
        "model.classifier": (4, 4), "output": (4, 64),
    },
    "lraspp_mobilenet_v3_large": {
        "model.backbone.4": (40, 8), "model.backbone.16": (960, 4),
        "model.classifier.cbr": (128, 4), "model.classifier": (4, 8), "output": (4, 64),
    },
}  # fmt: skip
BACKBONE_TAP = {arch: "model.backbone.layer3" if "resnet" in arch else "model.backbone.4"
                for arch in ARCHITECTURES}  # fmt: skip


def test_every_architecture_has_its_taps_listed():
    assert set(TAPS) == set(ARCHITECTURES)
    doc = TorchvisionSegmentation.__doc__
    for arch, taps in TAPS.items():
        assert f"``{arch}``" in doc, arch
        for name in taps:
            assert f"``{name}``" in doc, name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_documented_torchvision_taps_are_single_feature_maps(arch):
    net = TorchvisionSegmentation(4, arch=arch).eval()
    with torch.no_grad():
        acts = ActivationTaps(net, TAPS[arch])(torch.randn(2, 3, 64, 64))
    found = {name: (a.shape[1], a.shape[-1]) for name, a in acts.items()}
    assert found == TAPS[arch]
    assert all(a.dim() == 4 and a.shape[0] == 2 and a.shape[-2] == a.shape[-1]
               for a in acts.values())  # fmt: skip


@pytest.mark.parametrize("arch", WITH_AUX)
def test_a_file_of_a_model_built_with_its_aux_head_loads_and_the_logits_are_its_main_heads(
    arch, tmp_path, caplog
):
    """torchvision's ``aux_loss=True`` model (its COCO files' layout): its ``aux_classifier.*``
    is dropped, everything else loads, and the adapter's logits are the model's ``out``."""
    with_aux = torchvision_model(arch, aux_loss=True).eval()
    assert any(k.startswith("aux_classifier.") for k in with_aux.state_dict())
    path = tmp_path / f"{arch}.pth"
    torch.save(with_aux.state_dict(), path)
    caplog.set_level("WARNING", logger="dam_lightning.weights")
    net = TorchvisionSegmentation(4, arch=arch, weights=str(path)).eval()
    assert "dropped aux_classifier.* (this adapter has no auxiliary classifier)" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = with_aux(x)
        out = net(x)
    assert set(expected) == {"out", "aux"}
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected["out"])


def test_deeplabv3_trains_on_two_images_not_one():
    """Why the DeepLabV3 configs take batch 2, not AdaptSegNet's 1: ASPP's image pooling has a
    BatchNorm over a 1x1 map."""
    net = TorchvisionSegmentation(4, arch="deeplabv3_mobilenet_v3_large").train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(torch.randn(1, 3, 64, 64))
    net(torch.randn(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gam_sizes_its_discriminators_from_a_backbone_tap(arch):
    tap = BACKBONE_TAP[arch]
    net = functools.partial(TorchvisionSegmentation, arch=arch, example_input_shape=(3, 64, 64))
    gam = GAMAdaptModule(net, num_classes=4, layers={tap: 1.0, "output": 1.0},
                         discriminator_width=8, task="segmentation")  # fmt: skip
    channels = TAPS[arch][tap][0]
    discriminator = gam.discriminators[tap.replace(".", "__")]
    assert discriminator.net[0].in_channels == channels
    with torch.no_grad():
        acts = gam.target_taps(torch.randn(2, 3, 64, 64))
        logits = discriminator(acts[tap])
    assert acts[tap].shape[:2] == (2, channels) and logits.shape[:2] == (2, 1)
    assert gam.discriminators["output"].net[0].in_channels == 4


def test_torchvision_weights_load_in_torchvision_adapter_or_checkpoint_layout(tmp_path):
    trained = TorchvisionSegmentation(4, arch="deeplabv3_mobilenet_v3_large")
    with_aux = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4, aux_loss=True
    )
    with_aux.load_state_dict(trained.model.state_dict(), strict=False)
    files = {
        "torchvision.pth": with_aux.state_dict(),  # aux_classifier.* is left out
        "adapter.pt": trained.state_dict(),
        "source.ckpt": {"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}},
    }
    for name, blob in files.items():
        torch.save(blob, tmp_path / name)
        loaded = TorchvisionSegmentation(
            4, arch="deeplabv3_mobilenet_v3_large", weights=str(tmp_path / name)
        )
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, trained.state_dict()[key]), (name, key)


def test_backbone_weights_load_from_the_classification_model(tmp_path):
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(classifier.state_dict(), path)
    net = TorchvisionSegmentation(4, backbone_weights=str(path))
    for key, value in net.model.backbone.state_dict().items():
        assert torch.equal(value, classifier.features.state_dict()[key]), key


def test_torchvision_weights_that_do_not_fit_are_clear_errors(tmp_path):
    path = tmp_path / "nineteen.pt"
    torch.save(TorchvisionSegmentation(19).state_dict(), path)
    with pytest.raises(ValueError, match=r"^weights: .*nineteen.pt does not fit Torchvision"
                       r"Segmentation: 4 wrongly shaped .* has 19 classes, the network's 4: set "
                       r"skip_mismatched_classifier: true"):  # fmt: skip
        TorchvisionSegmentation(4, weights=str(path))
    backbone = (r"^backbone_weights: .*nineteen.pt does not fit "
                r"TorchvisionSegmentation: \d+ missing .*is it a resnet50 state dict")  # fmt: skip
    with pytest.raises(ValueError, match=backbone):
        TorchvisionSegmentation(4, arch="fcn_resnet50", backbone_weights=str(path))
    with pytest.raises(FileNotFoundError, match=r"^weights: .*absent.pt does not exist.*never"):
        TorchvisionSegmentation(4, weights=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match=r"unknown arch 'unet'.*lraspp_mobilenet_v3_large"):
        TorchvisionSegmentation(4, arch="unet")


def test_a_torchvision_coco_file_loads_all_but_its_21_class_classifier_when_asked(
    tmp_path, caplog
):
    """torchvision's own DeepLabV3 COCO file layout (21 classes, ``aux_classifier.*``)."""
    coco = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).state_dict()
    path = tmp_path / "deeplabv3_mobilenet_v3_large-fc3c493d.pth"
    torch.save(coco, path)
    arch = "deeplabv3_mobilenet_v3_large"
    with pytest.raises(ValueError, match=r"^weights: .* 2 wrongly shaped \(model.classifier.4."
                       r"weight: file \(21, 256, 1, 1\), network \(19, 256, 1, 1\);.*the "
                       r"file's classifier \(model.classifier.4\) has 21 classes"):  # fmt: skip
        TorchvisionSegmentation(19, arch=arch, weights=str(path))
    caplog.set_level("WARNING", logger="dam_lightning.weights")
    torch.manual_seed(3)
    net = TorchvisionSegmentation(19, arch=arch, weights=str(path), skip_mismatched_classifier=True)
    torch.manual_seed(3)
    fresh = TorchvisionSegmentation(19, arch=arch)
    for key, value in net.state_dict().items():
        head = key.startswith("model.classifier.4.")
        expected = fresh.state_dict()[key] if head else coco[key[6:]]
        assert torch.equal(value, expected), key
    assert "dropped aux_classifier.* (this adapter has no auxiliary classifier)" in caplog.text
    assert "skipped the classifier model.classifier.4.weight, model.classifier.4.bias: the " \
        "file's has 21 classes, the network's 19" in caplog.text


@pytest.mark.parametrize("setting", ["backbone_weights", "weights"])
def test_a_torchvision_resnet101_imagenet_file_loads_the_backbone(tmp_path, setting, caplog):
    """torchvision's ``resnet101-cd907fc2.pth`` layout (``conv1``, ``layer1-4``, ``fc``) as
    ``backbone_weights``, or as ``weights`` (the backbone, the head left initialised)."""
    resnet = torchvision.models.resnet101(weights=None, num_classes=10).state_dict()
    path = tmp_path / "resnet101-cd907fc2.pth"
    torch.save(resnet, path)
    caplog.set_level("WARNING", logger="dam_lightning.weights")
    torch.manual_seed(5)
    net = TorchvisionSegmentation(4, arch="deeplabv3_resnet101", **{setting: str(path)})
    for key, value in net.model.backbone.state_dict().items():
        assert torch.equal(value, resnet[key]), key
    torch.manual_seed(5)
    fresh = TorchvisionSegmentation(4, arch="deeplabv3_resnet101")
    for key, value in net.model.classifier.state_dict().items():
        assert torch.equal(value, fresh.model.classifier.state_dict()[key]), key
    if setting == "weights":
        assert "the resnet101 classification model loaded into the backbone only" in caplog.text


# The DeepLabV3-ResNet101 configs


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text())


def test_the_deeplabv3_gam_config_taps_layers_of_its_network():
    model = _config("gta_deeplabv3.yaml")["model"]["init_args"]
    arch = model["net"]["init_args"]["arch"]
    assert arch == "deeplabv3_resnet101" and "weights" not in model["net"]["init_args"]
    published = _config("gta_deeplabv3_source.yaml")["trainer"]["callbacks"][1]["init_args"]
    assert model["source_weights"] == published["path"]
    net = functools.partial(TorchvisionSegmentation, arch=arch, example_input_shape=(3, 64, 64))
    gam = GAMAdaptModule(net, num_classes=19, layers=model["layers"], discriminator_width=8,
                         task="segmentation")  # fmt: skip
    expected = {"model.backbone.layer1": 256, "model.backbone.layer3": 1024,
                "model.backbone.layer4": 2048, "output": 19}  # the config's comment
    assert {n: gam.discriminators[n.replace(".", "__")].net[0].in_channels
            for n in model["layers"]} == expected  # fmt: skip


def _tiny_args(config: str, roots, *extra: str) -> list[str]:
    """A shipped DeepLabV3 config on the fixture datasets: 32x64 inputs, two steps, the CPU."""
    size = "[32, 64]"
    return [
        "fit", "--config", str(REPO / "configs" / config),
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=2",
        "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--model.init_args.net.init_args.example_input_shape=[3, 32, 64]",
        f"--data.source.init_args.root={roots / 'gta5'}",
        f"--data.target.init_args.root={roots / 'cityscapes'}",
        f"--data.target_val.init_args.root={roots / 'cityscapes'}",
        f"--data.source.init_args.transform.size={size}",
        f"--data.target.init_args.transform.size={size}",
        f"--data.target_val.init_args.transform.size={size}",
        "--data.num_workers=0",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_the_deeplabv3_configs_run_stage_1_from_an_imagenet_file_then_gam(tmp_path, monkeypatch):
    """Stage 1 reads the ImageNet ResNet-101 file at the config's own path, stage 2 + 3 adapt
    the network it publishes."""
    write_gta5(tmp_path / "gta5", n=4, size=(24, 44))
    write_cityscapes(tmp_path / "cityscapes", "train", per_city=2, size=(32, 64))
    write_cityscapes(tmp_path / "cityscapes", "val", per_city=1, size=(64, 128), seed=1)
    monkeypatch.chdir(tmp_path)
    imagenet = _config("gta_deeplabv3_source.yaml")["model"]["init_args"]["net"]["init_args"][
        "backbone_weights"]  # fmt: skip
    (tmp_path / imagenet).parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), tmp_path / imagenet)
    main(_tiny_args("gta_deeplabv3_source.yaml", tmp_path))
    source = tmp_path / "runs" / "gta_deeplabv3_source" / "source.ckpt"
    assert source.is_file()
    main(_tiny_args("gta_deeplabv3.yaml", tmp_path, "--model.init_args.discriminator_width=8"))
    assert list((tmp_path / "runs" / "gta_deeplabv3").rglob("last.ckpt"))
