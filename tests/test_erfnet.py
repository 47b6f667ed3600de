"""ERFNet as method.md section 3 specifies it (layout, sizes, paper taps, weights files); the
torchvision adapter's tests are in test_torchvision_models.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dam_lightning.matching.taps import ActivationTaps, resolve_layer
from dam_lightning.models import ERFNet


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
    with pytest.raises(FileNotFoundError, match=r"^weights: .*nothing.pt does not exist; pass"):
        ERFNet(5, width=0.25, weights=str(missing))
    other = tmp_path / "other_classes.pt"
    torch.save(small_erfnet(num_classes=19).state_dict(), other)
    with pytest.raises(ValueError, match=r"^weights: .*other_classes.pt does not fit ERFNet: 2 "
                       r"wrongly shaped .*19 classes, the network's 5: set "
                       r"skip_mismatched_classifier: true"):  # fmt: skip
        ERFNet(5, width=0.25, weights=str(other))
    encoder = tmp_path / "encoder.pt"
    torch.save(small_erfnet(encoder_only=True).state_dict(), encoder)
    decoder_keys = [k for k in small_erfnet().state_dict() if k.startswith("decoder.")]
    decoder_keys = [k for k in decoder_keys if not k.endswith("num_batches_tracked")]
    with pytest.raises(ValueError) as info:
        ERFNet(5, width=0.25, weights=str(encoder))
    assert f"encoder.pt does not fit ERFNet: {len(decoder_keys)} missing (" in str(info.value)
    shown = ", ".join(decoder_keys[:3])
    assert f"({shown} and {len(decoder_keys) - 3} more); was it saved" in str(info.value)


# The authors' files (Eromera/erfnet_pytorch): their Net has this ERFNet's keys, but always the
# encoder's own classifier encoder.output_conv too; their files were written by torch < 0.4
# (no num_batches_tracked), the released one and the training checkpoints through DataParallel.


def authors_state(num_classes: int = 20, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The state dict of the authors' ``Net(num_classes)`` at width 0.25, in their layout."""
    full = ERFNet(num_classes, width=0.25).state_dict()
    encoder_classifier = {
        k: v
        for k, v in ERFNet(num_classes, encoder_only=True, width=0.25).state_dict().items()
        if k.startswith("encoder.output_conv.")
    }
    state = {**full, **encoder_classifier}
    return {prefix + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _same_as(net: nn.Module, source: dict[str, torch.Tensor], skip=()) -> None:
    """Every tensor of ``net`` (but ``skip``) equals ``source``'s, ``module.`` removed."""
    source = {k.removeprefix("module."): v for k, v in source.items()}
    for name, value in net.state_dict().items():
        if not name.endswith("num_batches_tracked") and not name.startswith(skip):
            assert torch.equal(value, source[name]), name


def _fresh(num_classes, **kwargs) -> ERFNet:
    torch.manual_seed(7)
    return ERFNet(num_classes, width=0.25, **kwargs).eval()


def test_the_authors_released_checkpoint_loads_with_its_20_classes(tmp_path, caplog):
    """``erfnet_pretrained.pth``: ``torch.save(DataParallel(Net(20)).state_dict())``."""
    released = authors_state(20)
    torch.save(released, tmp_path / "erfnet_pretrained.pth")
    caplog.set_level("WARNING", logger="dam_lightning.weights")
    net = ERFNet(20, width=0.25, weights=str(tmp_path / "erfnet_pretrained.pth")).eval()
    _same_as(net, released)
    assert "dropped encoder.output_conv.* (the encoder-only classifier, unused" in caplog.text
    assert "weights: " in caplog.text
    # the encoder-only network takes the same file: its classifier is the authors' encoder's
    encoder = ERFNet(20, True, width=0.25, weights=str(tmp_path / "erfnet_pretrained.pth"))
    _same_as(encoder, released)
    assert "dropped decoder.* (unused by the encoder-only network" in caplog.text


def test_the_authors_20_classes_into_19_need_the_option_and_skip_only_the_classifier(
    tmp_path, caplog
):
    released = authors_state(20)
    torch.save(released, tmp_path / "erfnet_pretrained.pth")
    path = str(tmp_path / "erfnet_pretrained.pth")
    with pytest.raises(ValueError) as info:
        ERFNet(19, width=0.25, weights=path)
    assert str(info.value) == (
        f"weights: {path} does not fit ERFNet: 2 wrongly shaped (decoder.output_conv.weight: "
        "file (4, 20, 2, 2), network (4, 19, 2, 2); decoder.output_conv.bias: file (20,), "
        "network (19,)); the file's classifier (decoder.output_conv) has 20 classes, the "
        "network's 19: set skip_mismatched_classifier: true to load everything else and leave "
        "the classifier initialised, or give the network 20 classes"
    )
    caplog.set_level("WARNING", logger="dam_lightning.weights")
    net = _fresh(19, weights=path, skip_mismatched_classifier=True)
    _same_as(net, released, skip="decoder.output_conv.")
    initialised = _fresh(19).decoder.output_conv
    assert torch.equal(net.decoder.output_conv.weight, initialised.weight)
    assert torch.equal(net.decoder.output_conv.bias, initialised.bias)
    assert (
        f"weights: {path}: skipped the classifier decoder.output_conv.weight, "
        "decoder.output_conv.bias: the file's has 20 classes, the network's 19; it starts "
        "initialised"
    ) in caplog.text


def test_the_authors_training_checkpoint_loads(tmp_path):
    """``save_checkpoint({'epoch', 'arch', 'state_dict', 'best_acc', 'optimizer'})`` of
    their main.py, through DataParallel; read as weights only like every file."""
    trained = ERFNet(20, width=0.25)
    optimizer = torch.optim.Adam(trained.parameters(), 5e-4)
    trained(torch.randn(1, 3, 16, 16)).mean().backward()
    optimizer.step()
    state = authors_state(20)
    state.update({f"module.{k}": v for k, v in trained.state_dict().items()
                  if not k.endswith("num_batches_tracked")})  # fmt: skip
    checkpoint = {"epoch": 151, "arch": str(trained), "state_dict": state, "best_acc": 0.72,
                  "optimizer": optimizer.state_dict()}  # fmt: skip
    torch.save(checkpoint, tmp_path / "checkpoint.pth.tar")
    net = ERFNet(20, width=0.25, weights=str(tmp_path / "checkpoint.pth.tar")).eval()
    _same_as(net, state)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), trained.eval()(x))


@pytest.mark.parametrize("encoder_only", [False, True], ids=["full", "encoder"])
def test_a_plain_state_dict_of_the_reference_network_loads(tmp_path, encoder_only):
    reference = authors_state(19, prefix="")
    torch.save(reference, tmp_path / "erfnet.pt")
    net = ERFNet(19, encoder_only, width=0.25, weights=str(tmp_path / "erfnet.pt"))
    _same_as(net, reference)


def test_the_imagenet_encoder_loads_into_the_encoder_only(tmp_path, caplog):
    """The authors' ``erfnet_encoder_pretrained.pth.tar``: their ImageNet ``ERFNet(1000)``
    (``features.encoder`` and a ``classifier.linear``) through DataParallel."""
    encoder = {k: v for k, v in ERFNet(19, width=0.25).state_dict().items()
               if k.startswith("encoder.") and not k.endswith("num_batches_tracked")}  # fmt: skip
    state = {f"module.features.{k}": v for k, v in encoder.items()}
    state["module.classifier.linear.weight"] = torch.randn(10, 32)
    state["module.classifier.linear.bias"] = torch.randn(10)
    blob = {"epoch": 90, "arch": "erfnet", "state_dict": state, "best_prec1": 72.1}
    torch.save(blob, tmp_path / "erfnet_encoder_pretrained.pth.tar")
    caplog.set_level("WARNING", logger="dam_lightning.weights")
    for encoder_only in (False, True):
        path = str(tmp_path / "erfnet_encoder_pretrained.pth.tar")
        net = _fresh(19, encoder_only=encoder_only, weights=path)
        _same_as(net, encoder, skip=("decoder.", "encoder.output_conv."))
        fresh = _fresh(19, encoder_only=encoder_only)
        for name, value in fresh.state_dict().items():
            if name.startswith(("decoder.", "encoder.output_conv.")):
                assert torch.equal(net.state_dict()[name], value), name
    assert (
        "the ImageNet-pretrained encoder (features.encoder.*) loaded into the encoder only; "
        "the decoder and the classifier start initialised (ImageNet's classifier.linear "
        "dropped)"
    ) in caplog.text


def test_files_of_another_network_say_so_naming_the_setting(tmp_path):
    from dam_lightning.weights import load_network_weights

    state = {**authors_state(19, prefix=""), **{f"bogus.{i}": torch.zeros(1) for i in range(5)}}
    torch.save(state, tmp_path / "extra.pt")
    extra = (r"^init_weights: .*extra.pt does not fit ERFNet: 5 "
             r"unexpected \(bogus.0, bogus.1, bogus.2 and 2 more\); was it saved")  # fmt: skip
    with pytest.raises(ValueError, match=extra):
        load_network_weights(ERFNet(19, width=0.25), str(tmp_path / "extra.pt"),
                             setting="init_weights")  # fmt: skip
    torch.save({"conv1.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}, tmp_path / "r.pt")
    foreign = (r"^source_weights: .* none of the file's 2 keys is a key of ERFNet \(the "
               r"file's start conv1., fc., the network's decoder., encoder.\): is it the "
               r"weights of another network\?")  # fmt: skip
    with pytest.raises(ValueError, match=foreign):
        load_network_weights(ERFNet(19, width=0.25), str(tmp_path / "r.pt"))
