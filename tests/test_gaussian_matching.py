"""Gaussian i.i.d. matching: after it, the target statistics equal the source statistics at
every matched layer, computed here independently of the library's own statistics code."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dam_lightning.matching.gaussian import (
    ChannelStatsAccumulator,
    foldable_layers,
    gaussian_match,
    measure_statistics,
)


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


def domains(seed: int = 0, batches: int = 4):
    g = torch.Generator().manual_seed(seed)
    source = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(batches)]
    target = [2 * torch.randn(16, 1, 8, 8, generator=g) + 0.5 for _ in range(batches)]
    return source, target


def source_and_perturbed_target(make_net):
    torch.manual_seed(0)
    source = make_net().eval()
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return source, target


def reference_statistics(net: nn.Module, batches, layers) -> dict[str, tuple]:
    """Per-channel (mean, std) of each layer's output over all batches, by torch.std_mean."""
    outputs = {name: [] for name in layers}
    modules = dict(net.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: outputs[n].append(out))
        for n in layers
    ]
    with torch.no_grad():
        net.eval()
        for x in batches:
            net(x)
    for h in handles:
        h.remove()
    result = {}
    for name, outs in outputs.items():
        a = torch.cat(outs).double().transpose(0, 1).reshape(outs[0].shape[1], -1)
        std, mean = torch.std_mean(a, dim=1, unbiased=False)
        result[name] = (mean, std)
    return result


def assert_matched(source_net, target_net, source_batches, target_batches, layers):
    expected = reference_statistics(source_net, source_batches, layers)
    found = reference_statistics(target_net, target_batches, layers)
    for name in layers:
        (mu_s, sd_s), (mu_t, sd_t) = expected[name], found[name]
        assert ((mu_t - mu_s).abs() <= 1e-3 * (sd_s + mu_s.abs())).all(), name
        assert ((sd_t - sd_s).abs() <= 1e-3 * sd_s).all(), name


@pytest.mark.parametrize("mode", ["one_pass", "layerwise"])
@pytest.mark.parametrize("make_net", [conv_linear_net, batchnorm_net], ids=["conv", "bn"])
def test_target_statistics_equal_source_statistics_at_every_layer(make_net, mode):
    source_net, target_net = source_and_perturbed_target(make_net)
    xs, xt = domains()
    layers = foldable_layers(target_net)
    before = measure_statistics(target_net, xt, layers)
    source = measure_statistics(source_net, xs, layers)
    assert max((before[n].mean - source[n].mean).abs().max() for n in layers) > 0.1

    report = gaussian_match(source_net, target_net, xs, xt, mode=mode)
    assert list(report.layers) == layers  # network order
    assert_matched(source_net, target_net, xs, xt, layers)
    assert all(m.mean_gap_after < 1e-4 and m.std_gap_after < 1e-4 for m in report.layers.values())


def test_statistics_accumulate_over_batches_like_one_big_batch():
    torch.manual_seed(1)
    batches = [torch.randn(7, 3, 5, 5) * 3 + 2 for _ in range(5)]
    acc = ChannelStatsAccumulator()
    for b in batches:
        acc.update(b)
    stats = acc.compute()
    std, mean = torch.std_mean(
        torch.cat(batches).double().transpose(0, 1).reshape(3, -1), dim=1, unbiased=False
    )
    assert torch.allclose(stats.mean, mean) and torch.allclose(stats.std, std)
    assert stats.count == 5 * 7 * 25


def test_matching_twice_changes_nothing():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    xs, xt = domains()
    gaussian_match(source_net, target_net, xs, xt)
    once = copy.deepcopy(target_net.state_dict())
    gaussian_match(source_net, target_net, xs, xt)
    for name, value in target_net.state_dict().items():
        assert torch.allclose(value, once[name], rtol=1e-4, atol=1e-6), name


def test_one_pass_and_layerwise_fold_the_same_weights():
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    other = copy.deepcopy(target_net)
    xs, xt = domains()
    gaussian_match(source_net, target_net, xs, xt, mode="one_pass")
    gaussian_match(source_net, other, xs, xt, mode="layerwise")
    for name, value in target_net.state_dict().items():
        assert torch.allclose(value, other.state_dict()[name], rtol=1e-4, atol=1e-6), name


def test_one_pass_runs_each_layer_once_per_batch_whatever_the_number_of_layers():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    calls = {name: 0 for name in foldable_layers(target_net)}
    modules = dict(target_net.named_modules())
    for name in calls:
        modules[name].register_forward_hook(
            lambda m, a, o, n=name: calls.__setitem__(n, calls[n] + 1)
        )
    xs, xt = domains(batches=6)
    gaussian_match(source_net, target_net, xs, xt, mode="one_pass")
    assert set(calls.values()) == {len(xt)}  # one forward pass over the batches, not one per layer


def test_adabn_sets_running_statistics_to_the_target_input_statistics():
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    xs, xt = domains()
    gamma = target_net[1].weight.detach().clone()
    beta = target_net[1].bias.detach().clone()
    inputs = []
    handle = target_net[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    reference_statistics(target_net, xt, ["1"])  # conv 0 is not matched: its output is BN's input
    handle.remove()
    var, mean = torch.var_mean(torch.cat(inputs).transpose(0, 1).reshape(4, -1), 1, unbiased=False)

    gaussian_match(source_net, target_net, xs, xt, layers=["1"], batchnorm="adabn")
    bn = target_net[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert torch.equal(bn.weight, gamma) and torch.equal(bn.bias, beta)
    out_mean, out_std = reference_statistics(target_net, xt, ["1"])["1"]
    assert torch.allclose(out_mean, beta.double(), atol=1e-4)
    assert torch.allclose(out_std, gamma.double().abs(), rtol=1e-3)


def test_cached_source_statistics_give_the_same_result():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    other = copy.deepcopy(target_net)
    xs, xt = domains()
    layers = foldable_layers(target_net)
    cached = measure_statistics(source_net, xs, layers)
    gaussian_match(source_net, target_net, xs, xt)
    gaussian_match(source_net, other, [], xt, source_stats=cached)
    for name, value in target_net.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name


def test_modes_restored_source_untouched_parameters_kept_in_place():
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    target_net.train()
    target_net[1].eval()  # a mixed state must come back exactly
    flags = [m.training for m in target_net.modules()]
    ids = [id(p) for p in target_net.parameters()]
    source_state = copy.deepcopy(source_net.state_dict())
    xs, xt = domains()
    gaussian_match(source_net, target_net, xs, xt)
    assert [m.training for m in target_net.modules()] == flags
    assert [id(p) for p in target_net.parameters()] == ids
    for name, value in source_net.state_dict().items():
        assert torch.equal(value, source_state[name])


def test_statistics_are_reduced_across_processes():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    xs, _ = domains()
    layers = foldable_layers(target_net)
    alone = measure_statistics(source_net, xs, layers)
    twice = measure_statistics(source_net, xs, layers, reduce=lambda t: 2 * t)  # two equal ranks
    for name in layers:
        assert torch.allclose(alone[name].mean, twice[name].mean)
        assert torch.allclose(alone[name].std, twice[name].std)
        assert twice[name].count == 2 * alone[name].count


def test_dead_target_channel_is_shifted_not_scaled():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    with torch.no_grad():
        target_net[7].weight[2].zero_()  # logit 2 is constant on the target
    xs, xt = domains()
    report = gaussian_match(source_net, target_net, xs, xt, layers=["7"])
    assert report.layers["7"].alpha[2] == 1.0


def test_layers_that_cannot_be_folded_are_clear_errors():
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    xs, xt = domains()
    with pytest.raises(ValueError, match=r"layer '2' is a ReLU.*name the Conv/Linear before it"):
        gaussian_match(source_net, target_net, xs, xt, layers=["2"])
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) has no bias"):
        gaussian_match(source_net, target_net, xs, xt, layers=["0"])
    with pytest.raises(ValueError, match=r"no layer named 'conv9'.*Valid layer names: 0, 1"):
        gaussian_match(source_net, target_net, xs, xt, layers=["conv9"])
    plain_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False))
    with pytest.raises(ValueError, match="affine=False.*batchnorm='adabn'"):
        gaussian_match(plain_bn, copy.deepcopy(plain_bn), xs, xt, layers=["1"])
