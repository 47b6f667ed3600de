"""ActivationTaps: the right activations, graph kept, clear errors for wrong names."""

from __future__ import annotations

import pytest
import torch

from dam_lightning.matching.taps import ActivationTaps, resolve_layer
from dam_lightning.models import LeNet


def test_taps_return_the_named_layers_outputs():
    net = LeNet(10)
    x = torch.rand(3, 1, 28, 28)
    acts = ActivationTaps(net, ["fc3", "fc4", "conv2"])(x)
    assert list(acts) == ["fc3", "fc4", "conv2"]
    assert acts["fc3"].shape == (3, 500) and (acts["fc3"] >= 0).all()  # after the ReLU
    assert torch.equal(acts["fc4"], net(x))
    assert acts["conv2"].shape == (3, 50, 4, 4)


def test_taps_keep_the_graph_and_leave_no_hooks_behind():
    net = LeNet(10)
    acts = ActivationTaps(net, ["fc4"])(torch.rand(2, 1, 28, 28))
    acts["fc4"].sum().backward()
    assert net.conv1[0].weight.grad is not None
    assert all(not m._forward_hooks for m in net.modules())


def test_wrong_layer_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"no layer named 'fc5'.*fc3\.1.*fc4"):
        ActivationTaps(LeNet(10), ["fc5"])
    with pytest.raises(ValueError, match="no layer named ''"):
        resolve_layer(LeNet(10), "")


def test_duplicate_layer_names_are_refused():
    with pytest.raises(ValueError, match="unique"):
        ActivationTaps(LeNet(10), ["fc3", "fc3"])
