"""Gaussian matching on segmentation networks: on ERFNet (both variants, both BatchNorm
treatments, both modes) the target statistics after matching, measured again in a fresh pass,
equal the source statistics; SyncBatchNorm is matched like BatchNorm2d; a grouped transposed
convolution is left out of the default layers instead of failing the matching."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dam_lightning.matching import foldable_layers, gaussian_match, measure_statistics
from dam_lightning.models import ERFNet, TorchvisionSegmentation
from tests.test_gaussian_matching import layer_activations, reference_statistics

MODES = ["one_pass", "layerwise"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def trained_looking(net: nn.Module) -> nn.Module:
    """Give every BatchNorm running statistics and gamma/beta away from the identity."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    return net.eval()


def source_and_target(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    source = trained_looking(net)
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return source, target


def erfnets(encoder_only: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return source_and_target(ERFNet(5, encoder_only=encoder_only, width=0.25))


def images(seed: int = 0, batches: int = 2, size=(32, 64)):
    """Source ~ N(0, 1) images, target ~ 2 N(0, 1) + 0.5 plus uniform noise."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, *size)
    source = [torch.randn(shape, generator=g) for _ in range(batches)]
    target = [
        2 * torch.randn(shape, generator=g) + 0.5 + 0.3 * torch.rand(shape, generator=g)
        for _ in range(batches)
    ]
    return source, target


def assert_same_statistics(found, expected, name, rtol=1e-3, atol=1e-5, alive=None):
    """Per-channel equality of two ChannelStats up to float32 round-off (``atol`` for channels
    that are constant: a dead ReLU in front of a random ERFNet's later layers). The std is
    compared only where ``alive``: a channel constant on the target before matching can only
    be shifted (gaussian_match's ``eps``)."""
    scale = expected.std + expected.mean.abs()
    assert ((found.mean - expected.mean).abs() <= rtol * scale + atol).all(), name
    close = (found.std - expected.std).abs() <= rtol * expected.std + atol
    assert close[alive if alive is not None else slice(None)].all(), name


def is_batchnorm(net: nn.Module, name: str) -> bool:
    return isinstance(net.get_submodule(name), nn.modules.batchnorm._BatchNorm)


def test_erfnet_default_layers_are_every_batchnorm_and_every_conv():
    net = ERFNet(5, encoder_only=True, width=0.25)
    layers = foldable_layers(net)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(layers) == sorted(convs + bns)  # every ERFNet conv has a bias
    # The downsampler's conv feeds a concat with the max-pool: still one channel per output.
    assert layers[:2] == ["encoder.initial_block.conv", "encoder.initial_block.bn"]
    full = foldable_layers(ERFNet(5, width=0.25))
    assert "decoder.layers.0.conv" in full and full[-1] == "decoder.output_conv"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("encoder_only", [True, False], ids=["encoder", "full"])
def test_fold_gives_every_erfnet_layer_the_source_statistics(encoder_only, mode):
    source_net, target_net = erfnets(encoder_only)
    xs, xt = images()
    layers = foldable_layers(target_net)
    source = measure_statistics(source_net, xs, layers)
    before = measure_statistics(target_net, xt, layers)
    assert max((before[n].mean - source[n].mean).abs().max() for n in layers) > 0.5

    report = gaussian_match(source_net, target_net, xs, xt, batchnorm="fold", mode=mode)

    assert list(report.layers) == layers  # ERFNet registers its layers in execution order
    after = measure_statistics(target_net, xt, layers)  # a fresh pass on the corrected F_t
    for name in layers:
        assert_same_statistics(after[name], source[name], name)
        assert_same_statistics(report.layers[name].target_after, after[name], name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("encoder_only", [True, False], ids=["encoder", "full"])
def test_adabn_gives_erfnet_convs_the_source_statistics_and_bns_their_gamma_beta(
    encoder_only, mode
):
    """With AdaBN a BatchNorm normalises its target input with the target's own statistics, so
    its output has mean beta and std |gamma| (shrunk by its eps), not the source statistics;
    the convolutions are still folded to the source statistics."""
    source_net, target_net = erfnets(encoder_only)
    xs, xt = images()
    layers = foldable_layers(target_net)
    bns = [n for n in layers if is_batchnorm(target_net, n)]
    source = measure_statistics(source_net, xs, layers)

    report = gaussian_match(source_net, target_net, xs, xt, batchnorm="adabn", mode=mode)

    after = measure_statistics(target_net, xt, layers)
    inputs = layer_activations(target_net, xt, bns, inputs=True)
    for name in layers:
        assert_same_statistics(report.layers[name].target_after, after[name], name)
        if name not in bns:
            assert_same_statistics(after[name], source[name], name)
            continue
        bn = target_net.get_submodule(name)
        var = inputs[name].transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
        assert torch.allclose(bn.running_var.double(), var, rtol=1e-4, atol=1e-7), name
        shrink = (var / (var + bn.eps)).sqrt()
        assert torch.allclose(after[name].mean, bn.bias.double(), atol=1e-4), name
        expected_std = bn.weight.double().abs() * shrink
        assert torch.allclose(after[name].std, expected_std, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("batchnorm", ["fold", "adabn"])
def test_erfnet_one_pass_and_layerwise_give_the_same_weights(batchnorm):
    source_net, target_net = erfnets(encoder_only=False)
    other = copy.deepcopy(target_net)
    xs, xt = images()
    gaussian_match(source_net, target_net, xs, xt, batchnorm=batchnorm, mode="one_pass")
    gaussian_match(source_net, other, xs, xt, batchnorm=batchnorm, mode="layerwise")
    other_state = other.state_dict()
    for name, value in target_net.state_dict().items():
        assert torch.allclose(value, other_state[name], rtol=1e-4, atol=1e-5), name


def test_measured_statistics_agree_with_plain_torch_on_erfnet():
    """The fresh-pass check above relies on measure_statistics; check it here against
    torch.std_mean over hooked activations."""
    source_net, _ = erfnets(encoder_only=True)
    xs, _ = images()
    layers = ["encoder.layers.0.conv", "encoder.layers.6.bn", "encoder.output_conv"]
    measured = measure_statistics(source_net, xs, layers)
    for name, (std, mean) in reference_statistics(source_net, xs, layers).items():
        assert torch.allclose(measured[name].mean, mean, atol=1e-5), name
        assert torch.allclose(measured[name].std, std, rtol=1e-4, atol=1e-6), name


def sync_batchnorm_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.SyncBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
        nn.SyncBatchNorm(6),
    )  # fmt: skip


@pytest.mark.parametrize("batchnorm", ["fold", "adabn"])
@pytest.mark.parametrize("mode", MODES)
def test_sync_batchnorm_is_listed_and_matched(mode, batchnorm):
    torch.manual_seed(0)
    source_net, target_net = source_and_target(sync_batchnorm_net())
    assert foldable_layers(target_net) == ["1", "3", "4"]
    xs, xt = images(size=(8, 8))
    source = measure_statistics(source_net, xs, ["1", "3", "4"])

    report = gaussian_match(source_net, target_net, xs, xt, batchnorm=batchnorm, mode=mode)

    assert list(report.layers) == ["1", "3", "4"]
    after = measure_statistics(target_net, xt, ["1", "3", "4"])
    matched = ["1", "3", "4"] if batchnorm == "fold" else ["3"]
    for name in matched:
        assert_same_statistics(after[name], source[name], name)
    if batchnorm == "adabn":
        for name in ("1", "4"):
            assert torch.allclose(after[name].mean, target_net[int(name)].bias.double(), atol=1e-4)


def test_erfnet_converted_to_sync_batchnorm_keeps_its_layers_and_is_matched():
    source_net, target_net = erfnets(encoder_only=True)
    plain_layers = foldable_layers(target_net)
    source_net = nn.SyncBatchNorm.convert_sync_batchnorm(source_net).eval()
    target_net = nn.SyncBatchNorm.convert_sync_batchnorm(target_net).eval()
    assert foldable_layers(target_net) == plain_layers
    xs, xt = images()
    source = measure_statistics(source_net, xs, plain_layers)
    gaussian_match(source_net, target_net, xs, xt)
    after = measure_statistics(target_net, xt, plain_layers)
    for name in plain_layers:
        assert_same_statistics(after[name], source[name], name)


def grouped_transposed_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
        nn.BatchNorm2d(6),
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_a_grouped_transposed_conv_is_left_out_by_default_and_refused_by_name(mode):
    torch.manual_seed(0)
    source_net, target_net = source_and_target(grouped_transposed_net())
    assert foldable_layers(target_net) == ["0", "3"]
    xs, xt = images(size=(8, 8))
    source = measure_statistics(source_net, xs, ["0", "3"])
    report = gaussian_match(source_net, target_net, xs, xt, mode=mode)
    assert list(report.layers) == ["0", "3"]
    after = measure_statistics(target_net, xt, ["0", "3"])
    for name in ("0", "3"):
        assert_same_statistics(after[name], source[name], name)
    with pytest.raises(ValueError, match=r"layer '2' \(ConvTranspose2d\) has groups=2.*leave"):
        gaussian_match(source_net, target_net, xs, xt, layers=["2"], mode=mode)


def test_torchvision_adapter_is_matched_at_its_default_layers():
    torch.manual_seed(0)
    source_net, target_net = source_and_target(TorchvisionSegmentation(4))
    xs, xt = images(batches=2, size=(64, 64))
    layers = foldable_layers(target_net)
    source = measure_statistics(source_net, xs, layers)
    report = gaussian_match(source_net, target_net, xs, xt, batchnorm="fold", mode="one_pass")
    after = measure_statistics(target_net, xt, layers)
    for name in layers:
        # Constant target channels: behind a dead activation of this random net, and the
        # squeeze-excitation layers, which see one pooled value per image of i.i.d. noise.
        alive = report.layers[name].target_before.std >= 1e-5  # gaussian_match's eps
        assert_same_statistics(after[name], source[name], name, alive=alive)
