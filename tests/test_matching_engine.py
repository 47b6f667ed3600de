"""The engines of Gaussian matching (``dam_lightning.matching.engine``) keep the run's
precision, reduce across processes only from the calling thread, and hold the memory they state:
``layerwise`` one batch's forward whatever the number of calibration batches, ``one_pass`` one
forward's activations per paused batch and nothing more."""

from __future__ import annotations

import copy
import threading
import weakref

import pytest
import torch
from torch import Tensor, nn

from dam_lightning.matching import foldable_layers, gaussian_match, measure_statistics
from tests.test_gaussian_matching import (
    MODES,
    batchnorm_net,
    conv_linear_net,
    domains,
    source_and_perturbed_target,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def test_every_matched_layer_runs_under_the_callers_autocast():
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    other = copy.deepcopy(target_net)
    xs, xt = domains()
    layers = foldable_layers(target_net)  # Conv2d, Conv2d, Linear, Linear
    seen: dict[str, list] = {}

    def record(net: nn.Module, mode: str) -> list:
        seen[mode] = []
        return [
            net.get_submodule(name).register_forward_hook(
                lambda module, args, output, mode=mode: seen[mode].append(
                    (output.dtype, torch.is_autocast_enabled("cpu"), threading.current_thread())
                )
            )
            for name in layers
        ]

    handles = record(target_net, "one_pass") + record(other, "layerwise")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_this_thread = target_net(xt[0]).dtype
        seen["one_pass"].clear()
        gaussian_match(source_net, target_net, xs, xt, mode="one_pass")
        gaussian_match(source_net, other, xs, xt, mode="layerwise")
        for handle in handles:
            handle.remove()
        in_the_same_region = target_net(xt[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Autocast's cached bf16 weights of the first forward are not reused after the fold.
        assert torch.equal(in_the_same_region, target_net(xt[0]))

    assert in_this_thread == torch.bfloat16
    assert len(seen["one_pass"]) == len(layers) * len(xt)  # each layer once per batch
    for mode in MODES:
        assert {(dtype, enabled) for dtype, enabled, _ in seen[mode]} == {(torch.bfloat16, True)}
    assert threading.current_thread() not in {thread for *_, thread in seen["one_pass"]}
    # The same corrections, up to bf16 rounding (one_pass corrects a bf16 output in place,
    # layerwise recomputes it from the folded weights).
    other_state = other.state_dict()
    for name, value in target_net.state_dict().items():
        assert torch.allclose(value, other_state[name], rtol=1e-2, atol=1e-3), name


@pytest.mark.parametrize("batchnorm", ["fold", "adabn"])
@pytest.mark.parametrize("mode", MODES)
def test_statistics_are_reduced_only_in_the_calling_thread(mode, batchnorm):
    source_net, target_net = source_and_perturbed_target(batchnorm_net)
    xs, xt = domains(batchnorm_net)
    threads = []

    def recording_reduce(t: Tensor) -> Tensor:
        threads.append(threading.current_thread())
        return t

    report = gaussian_match(
        source_net, target_net, xs, xt, batchnorm=batchnorm, mode=mode, reduce=recording_reduce
    )
    # Once per layer for F_s, once per layer for F_t (twice for an AdaBN layer in layerwise:
    # its input and its output).
    assert len(threads) >= 2 * len(report.layers)
    assert set(threads) == {threading.current_thread()}


class LiveActivations:
    """The most bytes of module outputs alive at once, sampled after every module's forward in
    any thread (a global forward hook), each storage counted once. Weak references: an output
    counts as long as anything (a paused forward, the engine) keeps it."""

    def __init__(self):
        self.outputs: dict[int, weakref.ref] = {}
        self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, module: nn.Module, args, output) -> None:
        if not isinstance(output, Tensor):
            return
        with self.lock:
            self.outputs[id(output)] = weakref.ref(output)
            storages = {}
            for key, ref in list(self.outputs.items()):
                tensor = ref()
                if tensor is None:
                    del self.outputs[key]
                else:
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            self.peak = max(self.peak, sum(storages.values()))


def peak_activation_bytes(mode: str, batches: int) -> int:
    source_net, target_net = source_and_perturbed_target(conv_linear_net)
    xs, xt = domains(batches=batches)
    cached = measure_statistics(source_net, xs[:1], foldable_layers(target_net))
    live = LiveActivations()
    handle = nn.modules.module.register_module_forward_hook(live)
    try:
        gaussian_match(source_net, target_net, [], xt, mode=mode, source_stats=cached)
    finally:
        handle.remove()
    return live.peak


def test_layerwise_memory_is_flat_in_the_number_of_calibration_batches():
    assert peak_activation_bytes("layerwise", 2) == peak_activation_bytes("layerwise", 20) > 0


def test_one_pass_holds_one_forwards_activations_per_batch_and_nothing_more():
    # Exact lockstep keeps every paused forward's activations at the current layer (the next
    # layer is measured on all of them, corrected): a fixed amount per batch, linear in their
    # number, and that amount at most what one forward holds (no per-batch copies or lists).
    one, two, twenty = (peak_activation_bytes("one_pass", n) for n in (1, 2, 20))
    assert twenty - two == 18 * (two - one) > 0
    assert twenty <= 20 * one
