"""Segmentation networks: ERFNet as method.md section 3 specifies it (layout, sizes, paper taps,
weights files) and the torchvision adapter (logits tensor, local weights only)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dam_lightning.matching.taps import ActivationTaps, resolve_layer
from dam_lightning.models import ERFNet, TorchvisionSegmentation
from dam_lightning.models.torchvision import ARCHITECTURES


@pytest.fixture(autouse=True)
def seeded_on_one_thread(one_thread):
    """Seeded, on one thread (conftest's ``one_thread``: small tensors)."""
    torch.manual_seed(0)


def small_erfnet(encoder_only: bool = False, num_classes: int = 5, **kwargs) -> ERFNet:
    return ERFNet(num_classes, encoder_only=encoder_only, width=0.25, **kwargs).eval()


@pytest.mark.parametrize("size", [(32, 64), (48, 40)])
@pytest.mark.parametrize("encoder_only", [False, True], ids=["full", "encoder"])
def test_output_is_full_size_or_one_eighth_for_the_encoder(encoder_only, size):
    net = small_erfnet(encoder_only)
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size))
    stride = 8 if encoder_only else 1
    assert out.shape == (2, 5, size[0] // stride, size[1] // stride)


def test_about_2_06_million_parameters_for_19_classes():
    count = sum(p.numel() for p in ERFNet(19).parameters())
    assert abs(count - 2.06e6) <= 0.02 * 2.06e6, count


def test_encoder_only_model_is_the_17_sequential_layers_of_the_paper():
    net = small_erfnet(encoder_only=True)
    layers = [net.encoder.initial_block, *net.encoder.layers, net.encoder.output_conv]
    assert len(layers) == 17 and net.decoder is None
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds[0] == kinds[1] == kinds[7] == "DownsamplerBlock"
    assert all(k == "NonBottleneck1d" for k in kinds[2:7] + kinds[8:16])
    dilations = [block.conv3x1_2.dilation[0] for block in net.encoder.layers[7:]]
    assert dilations == [2, 4, 8, 16, 2, 4, 8, 16]
    assert isinstance(layers[16], nn.Conv2d) and layers[16].kernel_size == (1, 1)


def test_width_scales_every_channel_count():
    net = ERFNet(7, width=0.5)
    assert net.encoder.initial_block.bn.num_features == 8
    assert net.encoder.layers[0].bn.num_features == 32
    assert net.encoder.layers[14].bn2.num_features == 64
    assert net.decoder.layers[3].bn.num_features == 8
    with pytest.raises(ValueError, match=r"width=0.1 .*use width >= 0.25"):
        ERFNet(7, width=0.1)


def test_dropout_defaults_to_the_original_and_zero_turns_it_off():
    net = ERFNet(3, width=0.25)
    assert net.encoder.layers[1].dropout.p == 0.03 and net.encoder.layers[7].dropout.p == 0.3
    assert all(isinstance(block.dropout, nn.Identity) for block in net.decoder.layers[1:3])
    off = ERFNet(3, width=0.25, dropout=0)
    assert not any(isinstance(m, nn.Dropout2d) for m in off.modules())
    assert ERFNet(3, width=0.25, dropout=0.1).encoder.layers[14].dropout.p == 0.1


@pytest.mark.parametrize("shape", [(1, 3, 30, 64), (1, 1, 32, 64), (3, 32, 64)])
def test_inputs_that_are_not_rgb_multiples_of_8_are_clear_errors(shape):
    with pytest.raises(ValueError, match=r"multiples of 8, got shape .*512x1024"):
        small_erfnet()(torch.zeros(shape))


@pytest.mark.parametrize("encoder_only", [False, True], ids=["full", "encoder"])
def test_paper_taps_are_layers_4_8_12_17_and_every_table_name_is_one_tensor(encoder_only):
    taps = ERFNet.paper_taps(encoder_only)
    classifier = "encoder.output_conv" if encoder_only else "decoder.output_conv"
    assert taps == {
        "encoder.layers.2": 1.0, "encoder.layers.6": 1.0, "encoder.layers.10": 1.0,
        classifier: 1.0,
    }  # fmt: skip
    net = small_erfnet(encoder_only)
    table = ["encoder.initial_block", *(f"encoder.layers.{i}" for i in range(15)), classifier]
    if not encoder_only:
        table += [f"decoder.layers.{i}" for i in range(6)]
    for name in table:
        resolve_layer(net, name)
    with torch.no_grad():
        acts = ActivationTaps(net, table)(torch.zeros(2, 3, 32, 64))
    shapes = {name: tuple(a.shape) for name, a in acts.items()}
    assert shapes["encoder.initial_block"] == (2, 4, 16, 32)
    assert shapes["encoder.layers.2"] == (2, 16, 8, 16)  # the 2nd 64-channel block, 1/4
    assert shapes["encoder.layers.6"] == (2, 32, 4, 8)  # the downsampler to 128, 1/8
    assert shapes["encoder.layers.10"] == (2, 32, 4, 8)  # the dilation-16 block
    assert shapes[classifier] == ((2, 5, 4, 8) if encoder_only else (2, 5, 32, 64))
    if not encoder_only:
        assert shapes["decoder.layers.2"] == (2, 16, 8, 16)
        assert shapes["decoder.layers.5"] == (2, 4, 16, 32)


def test_example_input_shape_is_kept():
    assert ERFNet(3, width=0.25).example_input_shape == (3, 512, 1024)
    net = ERFNet(3, width=0.25, example_input_shape=[3, 64, 128])
    assert net.example_input_shape == (3, 64, 128)


@pytest.mark.parametrize("layout", ["state_dict", "source_checkpoint", "gam_checkpoint"])
def test_weights_round_trip_from_a_state_dict_or_checkpoint(tmp_path, layout):
    trained = small_erfnet()
    state = trained.state_dict()
    blob = {
        "state_dict": state,
        "source_checkpoint": {"state_dict": {f"net.{k}": v for k, v in state.items()}},
        "gam_checkpoint": {
            "state_dict": {
                **{f"target_net.{k}": v for k, v in state.items()},
                **{f"discriminators.x.{k}": v for k, v in state.items()},
            }
        },
    }[layout]
    path = tmp_path / "erfnet.ckpt"
    torch.save(blob, path)
    loaded = ERFNet(5, width=0.25, weights=str(path)).eval()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_weights_that_are_missing_or_do_not_fit_are_clear_errors(tmp_path):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(FileNotFoundError, match=r"ERFNet weights file .*nothing.pt does not"):
        ERFNet(5, width=0.25, weights=str(missing))
    other = tmp_path / "other_classes.pt"
    torch.save(small_erfnet(num_classes=19).state_dict(), other)
    with pytest.raises(ValueError, match=r"other_classes.pt does not fit ERFNet"):
        ERFNet(5, width=0.25, weights=str(other))
    encoder = tmp_path / "encoder.pt"
    torch.save(small_erfnet(encoder_only=True).state_dict(), encoder)
    with pytest.raises(ValueError, match=r"encoder.pt does not fit ERFNet: missing \['decoder"):
        ERFNet(5, width=0.25, weights=str(encoder))


# The torchvision adapter


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_torchvision_arch_returns_the_logits_tensor_at_the_input_size(arch):
    net = TorchvisionSegmentation(4, arch=arch).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 64, 64)
    assert not hasattr(net.model, "aux_classifier") or net.model.aux_classifier is None
    assert net.example_input_shape == (3, 512, 1024)


TAPS = {
    "lraspp_mobilenet_v3_large": {
        "model.backbone.4": (40, 8), "model.backbone.16": (960, 4),
        "model.classifier.cbr": (128, 4), "model.classifier": (4, 8),
    },
    "fcn_resnet50": {
        "model.backbone.layer1": (256, 16), "model.backbone.layer4": (2048, 8),
        "model.classifier.2": (512, 8), "model.classifier": (4, 8),
    },
}  # fmt: skip


@pytest.mark.parametrize("arch", list(TAPS))
def test_the_documented_torchvision_taps_are_single_tensors(arch):
    net = TorchvisionSegmentation(4, arch=arch).eval()
    with torch.no_grad():
        acts = ActivationTaps(net, TAPS[arch])(torch.randn(1, 3, 64, 64))
    found = {name: (a.shape[1], a.shape[-1]) for name, a in acts.items()}
    assert found == TAPS[arch]


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
    with pytest.raises(ValueError, match=r"nineteen.pt does not fit LRASPP .*num_classes"):
        TorchvisionSegmentation(4, weights=str(path))
    with pytest.raises(ValueError, match=r"nineteen.pt does not fit IntermediateLayerGetter"):
        TorchvisionSegmentation(4, arch="fcn_resnet50", backbone_weights=str(path))
    with pytest.raises(FileNotFoundError, match=r"absent.pt does not exist.*never made"):
        TorchvisionSegmentation(4, weights=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match=r"unknown arch 'unet'.*lraspp_mobilenet_v3_large"):
        TorchvisionSegmentation(4, arch="unet")
