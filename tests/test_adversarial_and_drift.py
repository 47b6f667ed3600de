"""Discriminators, GAN losses and weight drift against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dam_lightning.matching.adversarial import (
    GANLoss,
    MLPDiscriminator,
    PatchDiscriminator,
    discriminator_for,
)
from dam_lightning.matching.drift import weight_drift
from dam_lightning.models import LeNet


def test_discriminator_for_picks_mlp_for_vectors_and_patch_for_maps():
    assert isinstance(discriminator_for((2, 500)), MLPDiscriminator)
    patch = discriminator_for((2, 64, 32, 64))
    assert isinstance(patch, PatchDiscriminator)
    assert patch(torch.zeros(2, 64, 32, 64)).shape == (2, 1, 4, 8)  # three stride-2 halvings
    small = discriminator_for((2, 50, 4, 4))
    assert small(torch.zeros(2, 50, 4, 4)).shape == (2, 1, 4, 4)  # too small to downsample
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        discriminator_for((2, 3, 4))


def test_patch_discriminator_width_and_depth_set_its_hidden_channels():
    deep = discriminator_for((2, 11, 32, 32), patch_width=16, patch_depth=4)
    convs = [m for m in deep.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [16, 32, 64, 128, 1]
    assert deep(torch.zeros(2, 11, 32, 32)).shape == (2, 1, 4, 4)  # the fourth keeps 4x4


def test_gam_refuses_a_discriminator_without_hidden_layers():
    from dam_lightning.modules import GAMAdaptModule

    with pytest.raises(ValueError, match="discriminator_depth must be >= 1, got 0"):
        GAMAdaptModule(LeNet, discriminator_depth=0)


def test_mlp_discriminator_has_the_papers_500_500_shape():
    d = MLPDiscriminator(10)
    linears = [m for m in d.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 500), (500, 500), (500, 1)]


def test_vanilla_gan_losses_equal_hand_computed_cross_entropy():
    gan = GANLoss("vanilla")
    real, fake = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log(sigmoid(-x))
    expected_d = softplus(-2.0) + softplus(-1.0)  # -log sigmoid(2) - log(1 - sigmoid(-1))
    assert gan.discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert gan.generator_loss(fake).item() == pytest.approx(softplus(1.0), rel=1e-6)
    assert gan.accuracy(real, fake).item() == 1.0
    assert gan.accuracy(fake, real).item() == 0.0


def test_lsgan_losses_equal_hand_computed_squares():
    gan = GANLoss("lsgan")
    real, fake = torch.tensor([[0.5], [1.0]]), torch.tensor([[0.25], [0.0]])
    expected_d = 0.5 * ((0.25 + 0.0) / 2) + 0.5 * ((0.0625 + 0.0) / 2)
    assert gan.discriminator_loss(real, fake).item() == pytest.approx(expected_d)
    assert gan.generator_loss(fake).item() == pytest.approx(0.5 * (0.5625 + 1.0) / 2)
    with pytest.raises(ValueError, match="wgan"):
        GANLoss("wgan")


def test_vanilla_gan_loss_is_autocast_safe():
    gan = GANLoss("vanilla")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = nn.Linear(4, 1)(torch.randn(8, 4))
        loss = gan.discriminator_loss(logits, logits) + gan.generator_loss(logits)
    assert torch.isfinite(loss)


def test_weight_drift_is_zero_at_initialisation():
    source = LeNet(10)
    target = LeNet(10)
    target.load_state_dict(source.state_dict())
    assert weight_drift(target, source).item() == 0.0
    assert weight_drift(target, source, "sum").item() == 0.0


def test_weight_drift_equals_hand_computed_value_after_perturbation():
    source = LeNet(10)
    target = LeNet(10)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        target.fc4.weight[0, 0] += 0.5  # fc4.weight has 10 x 500 entries
        target.conv1[0].bias += 0.1  # 20 entries
    expected_mean = 0.25 / 5000 + 20 * 0.01 / 20
    expected_sum = 0.25 + 20 * 0.01
    assert weight_drift(target, source).item() == pytest.approx(expected_mean, rel=1e-4)
    assert weight_drift(target, source, "sum").item() == pytest.approx(expected_sum, rel=1e-4)


def test_weight_drift_gradient_reaches_only_the_target():
    source, target = LeNet(10), LeNet(10)
    weight_drift(target, source, "sum").backward()
    assert all(p.grad is None for p in source.parameters())
    with torch.no_grad():
        expected = 2 * (target.fc4.weight - source.fc4.weight)
    assert torch.allclose(target.fc4.weight.grad, expected)


def test_weight_drift_refuses_different_architectures():
    with pytest.raises(ValueError, match="same architecture|counterpart"):
        weight_drift(LeNet(10), LeNet(5))
    with pytest.raises(ValueError, match="reduction"):
        weight_drift(LeNet(10), LeNet(10), "max")


@pytest.mark.parametrize("reduction", ["mean_per_tensor", "sum"])
def test_weight_drift_on_erfnet_is_a_few_kernels_and_equals_the_per_tensor_formula(reduction):
    """ERFNet has 226 parameter tensors: the drift (forward + backward) must not cost a few
    kernels per tensor. Counted with a dispatch mode; autograd's own per-parameter `detach`
    when it stores a gradient (a view, no kernel) is left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dam_lightning.models import ERFNet

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    source, target = ERFNet(19, width=0.5), ERFNet(19, width=0.5)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    source.requires_grad_(False)
    terms = []
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        squared = (t - s).pow(2)
        terms.append(squared.mean() if reduction == "mean_per_tensor" else squared.sum())
    torch.stack(terms).sum().backward()
    expected = {n: p.grad.clone() for n, p in target.named_parameters()}
    reference = torch.stack(terms).sum().item()
    target.zero_grad(set_to_none=True)

    counter = CountOps()
    with counter:
        value = weight_drift(target, source, reduction)
        value.backward()
    kernels = [op for op in counter.ops if op is not torch.ops.aten.detach.default]
    assert len(kernels) <= 20, sorted({str(op) for op in kernels})
    assert value.item() == pytest.approx(reference, rel=1e-6)
    for name, p in target.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in source.parameters())
