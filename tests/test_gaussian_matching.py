"""Gaussian i.i.d. matching: after it, the target statistics equal the source statistics at
every matched layer, checked against statistics computed here with plain torch hooks and
``torch.std_mean``, independently of the library's own statistics code."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dam_lightning.matching.gaussian import LayerMatch, foldable_layers, gaussian_match
from dam_lightning.matching.statistics import (
    ChannelStats,
    ChannelStatsAccumulator,
    measure_statistics,
)

MODES = ["one_pass", "layerwise"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def conv_linear_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 5),
    )  # fmt: skip


def batchnorm_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5, bias=False), nn.BatchNorm1d(5),
    )  # fmt: skip
    with torch.no_grad():  # trained-looking BN state, not the identity
        for bn in (net[1], net[7]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return net


def sequence_net() -> nn.Sequential:
    """(N, C, L) activations, a transposed convolution and BatchNorm1d on 3-d input."""
    return nn.Sequential(
        nn.Conv1d(1, 3, 3), nn.ReLU(), nn.ConvTranspose1d(3, 4, 2, stride=2), nn.BatchNorm1d(4),
    )  # fmt: skip


def volume_net() -> nn.Sequential:
    """(N, C, D, H, W) activations."""
    return nn.Sequential(
        nn.Conv3d(1, 3, 3), nn.BatchNorm3d(3), nn.ReLU(), nn.ConvTranspose3d(3, 2, 2),
    )  # fmt: skip


INPUT_SHAPES = {
    conv_linear_net: (1, 8, 8),
    batchnorm_net: (1, 8, 8),
    sequence_net: (1, 12),
    volume_net: (1, 5, 5, 5),
}


def domains(make_net=conv_linear_net, seed: int = 0, batches: int = 4):
    """Source ~ N(0, 1), target ~ 2 N(0, 1) + 0.5 + non-Gaussian noise: different statistics."""
    g = torch.Generator().manual_seed(seed)
    shape = (16, *INPUT_SHAPES[make_net])
    source = [torch.randn(shape, generator=g) for _ in range(batches)]
    target = [
        2 * torch.randn(shape, generator=g) + 0.5 + 0.3 * torch.rand(shape, generator=g)
        for _ in range(batches)
    ]
    return source, target


def source_and_perturbed_target(make_net):
    torch.manual_seed(0)
    source = make_net().eval()
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return source, target


def layer_activations(net: nn.Module, batches, layers, inputs: bool = False) -> dict:
    """Each layer's output (or input) over all batches, concatenated, from plain torch hooks."""
    captured = {name: [] for name in layers}
    modules = dict(net.named_modules())
    if inputs:
        handles = [
            modules[n].register_forward_pre_hook(lambda m, a, n=n: captured[n].append(a[0]))
            for n in layers
        ]
    else:
        handles = [
            modules[n].register_forward_hook(lambda m, a, out, n=n: captured[n].append(out))
            for n in layers
        ]
    training = net.training
    net.eval()
    with torch.no_grad():
        for x in batches:
            net(x)
    net.train(training)
    for h in handles:
        h.remove()
    return {name: torch.cat(outs).double() for name, outs in captured.items()}


def std_mean_per_channel(activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    per_channel = activation.transpose(0, 1).reshape(activation.shape[1], -1)
    return torch.std_mean(per_channel, dim=1, unbiased=False)


def reference_statistics(net: nn.Module, batches, layers) -> dict[str, tuple]:
    """Per-channel (std, mean) of each layer's output over all batches."""
    return {
        name: std_mean_per_channel(a) for name, a in layer_activations(net, batches, layers).items()
    }


def assert_matched(source_net, target_net, source_batches, target_batches, layers):
    expected = reference_statistics(source_net, source_batches, layers)
    found = reference_statistics(target_net, target_batches, layers)
    for name in layers:
        (sd_s, mu_s), (sd_t, mu_t) = expected[name], found[name]
        assert ((mu_t - mu_s).abs() <= 1e-3 * (sd_s + mu_s.abs())).all(), name
        assert ((sd_t - sd_s).abs() <= 1e-3 * sd_s).all(), name


def assert_same_weights(net, other, rtol=1e-4, atol=1e-6):
    other_state = other.state_dict()
    for name, value in net.state_dict().items():
        assert torch.allclose(value, other_state[name], rtol=rtol, atol=atol), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "make_net",
    [conv_linear_net, batchnorm_net, sequence_net, volume_net],
    ids=["conv", "bn", "1d", "3d"],
)
def test_target_statistics_equal_source_statistics_at_every_layer(make_net, mode):
    source_net, target_net = source_and_perturbed_target(make_net)
    xs, xt = domains(make_net)
    layers = foldable_layers(target_net)
    before = reference_statistics(target_net, xt, layers)
    source = reference_statistics(source_net, xs, layers)
    assert max((before[n][1] - source[n][1]).abs().max() for n in layers) > 0.1

    report = gaussian_match(source_net, target_net, xs, xt, mode=mode)

    assert list(report.layers) == layers  # network order
    assert_matched(source_net, target_net, xs, xt, layers)
    assert all(m.mean_gap_before > 0.05 for m in report.layers.values())
    assert all(m.mean_gap_after < 1e-4 and m.std_gap_after < 1e-4 for m in report.layers.values())


def test_foldable_layers_are_the_layers_with_somewhere_to_put_the_correction():
    assert foldable_layers(conv_linear_net()) == ["0", "2", "5", "7"]
    assert foldable_layers(batchnorm_net()) == ["1", "3", "7"]  # bias-free layers feed a BN
    assert foldable_layers(sequence_net()) == ["0", "2", "3"]


@pytest.mark.parametrize("shape", [(7, 3), (7, 3, 5), (7, 3, 5, 4), (7, 3, 2, 3, 4)])
def test_statistics_accumulate_over_batches_like_one_big_batch(shape):
    torch.manual_seed(1)
    batches = [torch.randn(shape) * 3 + 2 for _ in range(5)]
    acc = ChannelStatsAccumulator()
    for b in batches:
        acc.update(b)
    stats = acc.compute()
    std, mean = std_mean_per_channel(torch.cat(batches).double())
    assert torch.allclose(stats.mean, mean) and torch.allclose(stats.std, std)
    assert stats.mean.dtype == stats.std.dtype == torch.float64
    assert stats.count == 5 * torch.Size(shape).numel() // 3


def test_measure_statistics_streams_to_the_one_shot_value():
    net = conv_linear_net().eval()
    xs, _ = domains(batches=5)
    layers = ["0", "1", "5", "7"]  # a ReLU can be measured, just not matched
    streamed = measure_statistics(net, xs, layers)
    one_shot = reference_statistics(net, [torch.cat(xs)], layers)
    for name in layers:
        std, mean = one_shot[name]
        assert torch.allclose(streamed[name].mean, mean, atol=1e-6), name
        assert torch.allclose(streamed[name].std, std, rtol=1e-5), name


def test_matching_twice_changes_nothing():
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    xs, xt = domains(batchnorm_net)
    gaussian_match(source_net, target_net, xs, xt)
    once = copy.deepcopy(target_net)
    report = gaussian_match(source_net, target_net, xs, xt)
    assert_same_weights(target_net, once)
    for match in report.layers.values():
        assert torch.allclose(match.alpha, torch.ones_like(match.alpha), rtol=1e-4)


@pytest.mark.parametrize("batchnorm", ["fold", "adabn"])
@pytest.mark.parametrize("make_net", [conv_linear_net, batchnorm_net], ids=["conv", "bn"])
def test_one_pass_and_layerwise_give_the_same_weights(make_net, batchnorm):
    source_net, target_net = source_and_perturbed_target(make_net)
    other = copy.deepcopy(target_net)
    xs, xt = domains(make_net)
    one_pass = gaussian_match(source_net, target_net, xs, xt, batchnorm=batchnorm)
    layerwise = gaussian_match(source_net, other, xs, xt, batchnorm=batchnorm, mode="layerwise")
    assert_same_weights(target_net, other)
    for name, match in one_pass.layers.items():
        assert torch.allclose(match.alpha, layerwise.layers[name].alpha, rtol=1e-4)
        assert torch.allclose(match.target_after.std, layerwise.layers[name].target_after.std)


def test_one_pass_runs_each_matched_layer_once_per_calibration_batch():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    calls = {name: 0 for name in foldable_layers(target_net)}
    modules = dict(target_net.named_modules())
    for name in calls:
        modules[name].register_forward_hook(
            lambda m, a, o, n=name: calls.__setitem__(n, calls[n] + 1)
        )
    xs, xt = domains(batches=6)
    gaussian_match(source_net, target_net, xs, xt, mode="one_pass")
    # One forward pass over the calibration set, not one per matched layer.
    assert set(calls.values()) == {len(xt)}


@pytest.mark.parametrize("mode", MODES)
def test_adabn_sets_running_statistics_to_the_target_input_statistics(mode):
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    xs, xt = domains(batchnorm_net)
    layers = ["1", "7"]
    bns = {name: target_net.get_submodule(name) for name in layers}
    affine = {name: (bn.weight.clone(), bn.bias.clone()) for name, bn in bns.items()}

    report = gaussian_match(
        source_net, target_net, xs, xt, layers=layers, batchnorm="adabn", mode=mode
    )

    # A fresh pass: BN 7's input depends on BN 1, so this also checks the layer order.
    inputs = layer_activations(target_net, xt, layers, inputs=True)
    outputs = reference_statistics(target_net, xt, layers)
    for name, bn in bns.items():
        std, mean = std_mean_per_channel(inputs[name])
        assert torch.allclose(bn.running_mean.double(), mean, atol=1e-5), name
        assert torch.allclose(bn.running_var.double(), std.square(), rtol=1e-4), name
        gamma, beta = affine[name]
        assert torch.equal(bn.weight, gamma) and torch.equal(bn.bias, beta), name
        out_std, out_mean = outputs[name]
        shrink = (std.square() / (std.square() + bn.eps)).sqrt()  # BN's eps in the denominator
        assert torch.allclose(out_mean, beta.double(), atol=1e-5), name
        assert torch.allclose(out_std, gamma.double().abs() * shrink, rtol=1e-4), name
        after = report.layers[name].target_after
        assert torch.allclose(after.mean, out_mean, atol=1e-5), name


def test_cached_source_statistics_give_the_same_result():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    other = copy.deepcopy(target_net)
    xs, xt = domains()
    cached = measure_statistics(source_net, xs, foldable_layers(target_net))
    gaussian_match(source_net, target_net, xs, xt)
    gaussian_match(source_net, other, iter(()), iter(xt), source_stats=cached)  # one-shot
    for name, value in target_net.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name


@pytest.mark.parametrize("mode", MODES)
def test_modes_restored_source_untouched_parameters_kept_in_place(mode):
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    target_net.train()
    target_net[1].eval()  # a mixed state must come back exactly
    flags = [m.training for m in target_net.modules()]
    params = list(target_net.parameters())
    source_state = copy.deepcopy(source_net.state_dict())
    xs, xt = domains(batchnorm_net)
    gaussian_match(source_net, target_net, xs, xt, mode=mode)
    assert [m.training for m in target_net.modules()] == flags
    assert not source_net.training
    after = list(target_net.parameters())
    assert all(p is q for p, q in zip(after, params, strict=True))
    for name, value in source_net.state_dict().items():
        assert torch.equal(value, source_state[name]), name


def test_statistics_are_reduced_across_processes():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    xs, xt = domains()
    layers = foldable_layers(target_net)

    def two_equal_ranks(t):
        return 2 * t

    alone = measure_statistics(source_net, xs, layers)
    twice = measure_statistics(source_net, xs, layers, reduce=two_equal_ranks)
    for name in layers:
        assert torch.allclose(alone[name].mean, twice[name].mean)
        assert torch.allclose(alone[name].std, twice[name].std)
        assert twice[name].count == 2 * alone[name].count

    other = copy.deepcopy(target_net)
    gaussian_match(source_net, target_net, xs, xt)
    report = gaussian_match(source_net, other, xs, xt, reduce=two_equal_ranks)
    assert_same_weights(target_net, other)
    assert report.layers["0"].target_before.count == 2 * len(xt) * 16 * 6 * 6


def test_dead_target_channel_is_shifted_not_scaled():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    with torch.no_grad():
        target_net[7].weight[2].zero_()  # logit 2 is constant on the target
    xs, xt = domains()
    report = gaussian_match(source_net, target_net, xs, xt, layers=["7"])
    assert report.layers["7"].alpha[2] == 1.0
    _, mu_s = reference_statistics(source_net, xs, ["7"])["7"]
    sd_t, mu_t = reference_statistics(target_net, xt, ["7"])["7"]
    assert torch.isclose(mu_t[2], mu_s[2], atol=1e-5) and sd_t[2] == 0


def test_summary_has_four_gaps_per_layer():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    xs, xt = domains()
    summary = gaussian_match(source_net, target_net, xs, xt, layers=["0", "7"]).summary()
    assert sorted(summary) == sorted(
        f"{gap}_{when}/{layer}"
        for gap in ("mean_gap", "std_gap")
        for when in ("before", "after")
        for layer in ("0", "7")
    )


def test_a_channel_constant_on_the_source_does_not_swamp_the_mean_gap():
    # A unit that weight decay has zeroed in F_s is constant on the source: sigma_s = 0.
    source = ChannelStats(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0]).double(), 100)
    target = ChannelStats(torch.tensor([-2.0, 0.5]), torch.tensor([0.1, 1.0]).double(), 100)
    match = LayerMatch("fc", source, target, target, torch.ones(2), torch.zeros(2))
    # |mu_t - mu_s| / sqrt((sigma_t^2 + sigma_s^2) / 2), averaged: (2 / sqrt(0.005) + 0.5) / 2
    assert match.mean_gap_before == pytest.approx((2 / 0.005**0.5 + 0.5) / 2, rel=1e-6)


def test_layers_that_cannot_be_folded_are_clear_errors():
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    xs, xt = domains(batchnorm_net)
    with pytest.raises(ValueError, match=r"layer '2' is a ReLU.*name the Conv/Linear before it"):
        gaussian_match(source_net, target_net, xs, xt, layers=["2"])
    with pytest.raises(ValueError, match=r"layer '6' \(Linear\) has no bias.*bias=True"):
        gaussian_match(source_net, target_net, xs, xt, layers=["6"])
    with pytest.raises(ValueError, match=r"no layer named 'conv9'.*Valid layer names: 0, 1"):
        gaussian_match(source_net, target_net, xs, xt, layers=["conv9"])
    plain_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False))
    with pytest.raises(ValueError, match="affine=False.*batchnorm='adabn'"):
        gaussian_match(plain_bn, copy.deepcopy(plain_bn), xs, xt, layers=["1"])


class SharedLayerNet(nn.Module):
    """Runs ``shared`` twice per forward: its weights cannot take two corrections."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(self.first(x))))


@pytest.mark.parametrize("mode", MODES)
def test_shared_or_unused_layers_are_refused_and_leave_the_target_unchanged(mode):
    torch.manual_seed(0)
    source_net, target_net = SharedLayerNet(), SharedLayerNet()
    state = copy.deepcopy(target_net.state_dict())
    xs, xt = [torch.randn(8, 4)], [2 * torch.randn(8, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="'shared' ran twice"):
        gaussian_match(source_net, target_net, xs, xt, layers=["first", "shared"], mode=mode)
    for name, value in target_net.state_dict().items():
        assert torch.equal(value, state[name]), name  # 'first' was folded, then restored
    with pytest.raises(ValueError, match=r"\['unused'\] were not called"):
        gaussian_match(source_net, target_net, xs, xt, layers=["first", "unused"], mode=mode)
    for name, value in target_net.state_dict().items():
        assert torch.equal(value, state[name]), name


class BranchingNet(nn.Module):
    """Runs ``rare`` only for a batch whose first feature has a positive mean."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.rare = nn.Linear(4, 4)

    def forward(self, x):
        return self.rare(x) if x[:, 0].mean() > 0 else self.first(x)


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_skipped_by_some_batches_is_refused_and_leaves_the_target_unchanged(mode):
    torch.manual_seed(0)
    source_net, target_net = BranchingNet(), BranchingNet()
    state = copy.deepcopy(target_net.state_dict())
    positive, negative = torch.rand(8, 4) + 1, -torch.rand(8, 4) - 1
    xs, xt = [positive, negative], [positive, negative, positive]
    with pytest.raises(ValueError, match="ran for 2 of 3 calibration batches"):
        gaussian_match(source_net, target_net, xs, xt, layers=["rare"], mode=mode)
    for name, value in target_net.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_channels_not_in_dim_1_are_refused():
    net = nn.Sequential(nn.Linear(3, 2))
    x = [torch.randn(4, 5, 3)]  # (N, L, features): the Linear's channels are last
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) has 2 channels.*\(4, 5, 2\)"):
        gaussian_match(net, copy.deepcopy(net), x, x)
