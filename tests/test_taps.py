"""ActivationTaps: the right activations, graph kept, clear errors for wrong names."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("how", ["wrapper", "in place", "a part", "after the taps"])
def test_a_compiled_network_is_refused_with_the_reason(how):
    """torch.compile is refused (issue 18, item 6): its graph keeps neither the layer names nor
    hooks added after tracing, so GAM would match wrong activations or none. Nothing compiles
    here: torch.compile is lazy, and the refusal comes before any forward."""
    net = LeNet(10)
    if how == "wrapper":
        net = torch.compile(net)
    elif how == "in place":
        net.compile()
    elif how == "a part":
        net.fc3 = torch.compile(net.fc3)
    taps = None
    with pytest.raises(ValueError, match="torch.compile is not supported") as error:
        taps = ActivationTaps(net, ["fc4"])
        net.compile()
        taps(torch.zeros(2, 1, 28, 28))
    assert ("fc3 is compiled" in str(error.value)) == (how == "a part")
    assert (taps is not None) == (how == "after the taps")


def test_a_matched_layer_that_returns_a_tuple_is_named_with_what_it_must_return():
    """The full message of ``HookRole.one_tensor`` (its doctest shows it shortened)."""
    from dam_lightning.errors import WrongTypeError
    from dam_lightning.matching.hooks import MATCHED

    expected = "layer 'fc' (Identity) returned tuple; a matched layer must return one tensor"
    with pytest.raises(WrongTypeError, match=f"^{re.escape(expected)}$"):
        MATCHED.one_tensor("fc", torch.nn.Identity(), (1, 2))
