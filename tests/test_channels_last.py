"""``channels_last=True`` on the segmentation networks: NHWC weights and activations, the same
outputs and gradients as the default layout (issue 19; measured on GPUs, checked here on CPU)."""

from __future__ import annotations

import pytest
import torch
import yaml

from dam_lightning.matching.taps import ActivationTaps
from dam_lightning.models import ERFNet
from dam_lightning.models.torchvision import TorchvisionSegmentation

NETWORKS = {
    "erfnet": lambda **kw: ERFNet(5, width=0.25, dropout=0.0, **kw),
    "erfnet-encoder": lambda **kw: ERFNet(5, encoder_only=True, width=0.25, dropout=0.0, **kw),
    "lraspp": lambda **kw: TorchvisionSegmentation(5, **kw),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_channels_last_gives_the_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    plain = NETWORKS[name]()
    nhwc = NETWORKS[name](channels_last=True)
    nhwc.load_state_dict(plain.state_dict())
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.randn(2, 3, 64, 64)
    for mode in (False, True):  # eval (running statistics), then training (batch statistics)
        plain.train(mode), nhwc.train(mode)
        expected, actual = plain(x), nhwc(x)
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    expected.square().mean().backward()
    actual.square().mean().backward()
    for (key, a), b in zip(plain.named_parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=key)


def test_taps_of_a_channels_last_network_see_the_same_activations():
    torch.manual_seed(0)
    plain = NETWORKS["erfnet"]().eval()
    nhwc = NETWORKS["erfnet"](channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    layers = ERFNet.paper_taps()
    x = torch.randn(1, 3, 32, 64)
    expected, actual = ActivationTaps(plain, layers)(x), ActivationTaps(nhwc, layers)(x)
    for layer in layers:
        torch.testing.assert_close(actual[layer], expected[layer], rtol=1e-3, atol=1e-3)


def test_the_gpu_configs_let_cudnn_choose_its_convolution_algorithms():
    from .conftest import REPO

    configs = sorted(REPO.glob("configs/gta*.yaml")) + sorted(REPO.glob("configs/synthia*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        assert yaml.safe_load(path.read_text())["trainer"]["benchmark"] is True, path.name
