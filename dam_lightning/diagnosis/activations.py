"""Record what the diagnosis needs of many layers in one forward pass over the calibration
batches: per-channel statistics (``ChannelStatsAccumulator``, the matching's own), channel-pooled
features per image, and a bounded random sample of each channel's values for histograms.

Forward hooks only (``dam_lightning.matching.hooks``, the matching's own): nothing here changes an
activation or a weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dam_lightning.diagnosis.discriminability import pool_channels
from dam_lightning.errors import ConfigError
from dam_lightning.matching import hooks
from dam_lightning.matching.hooks import DIAGNOSED, eval_mode, forward_hooks
from dam_lightning.matching.statistics import (
    ChannelStats,
    ChannelStatsAccumulator,
    mean_gap,
    std_gap,
)
from dam_lightning.matching.taps import resolve_layer


def within_process(moments: Tensor) -> Tensor:
    """The ``reduce`` of a diagnosis: statistics of this process's batches only. (A diagnosis
    is one process; summing across a process group that happens to exist would wait for
    processes that never call it.)"""
    return moments


def channel_gaps(target: ChannelStats, source: ChannelStats) -> Tensor:
    """(C,) per-channel mean gap + std gap: the two layer figures evaluated on each channel's
    statistics alone, to find the channels worth a histogram.

    Example:
        >>> s = ChannelStats(torch.zeros(2).double(), torch.ones(2).double(), 10)
        >>> t = ChannelStats(torch.tensor([0.0, 2.0]).double(), torch.ones(2).double(), 10)
        >>> [round(g, 6) for g in channel_gaps(t, s).tolist()]
        [0.0, 2.0]
    """

    def channel(stats: ChannelStats, k: int) -> ChannelStats:
        return ChannelStats(stats.mean[k : k + 1], stats.std[k : k + 1], stats.count)

    gaps = [
        mean_gap(channel(target, k), channel(source, k))
        + std_gap(channel(target, k), channel(source, k))
        for k in range(target.mean.numel())
    ]
    return torch.tensor(gaps, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class LayerRecording:
    """What one pass recorded at one layer.

    Attributes:
        stats: per-channel statistics over every value of every image; ``None`` for a layer
            recorded for ``fit_stats`` only.
        features: (N, C) channel-pooled features, one row per image, on the CPU; ``None`` for
            a layer recorded for its statistics only.
        samples: (C, S) values drawn at random positions (the same for every channel), on the
            CPU; ``None`` for a layer without histograms.
        fit_stats: the statistics of the images selected by ``fit_masks`` only (those Gaussian
            matching is fitted to); ``None`` unless asked for.
    """

    stats: ChannelStats | None
    features: Tensor | None
    samples: Tensor | None
    fit_stats: ChannelStats | None = None


class ValueSampler:
    """A uniform random sample of ``budget`` positions (pixels of images) of an activation
    streamed batch by batch, all channels at the same positions: each batch gives a share
    proportional to its images, so the sample never holds more than ``budget`` values per channel.

    Example:
        >>> sampler = ValueSampler(budget=10, total_images=4, generator=torch.Generator())
        >>> for _ in range(2):
        ...     sampler.update(torch.randn(2, 3, 5, 5))
        >>> sampler.compute().shape
        torch.Size([3, 10])
    """

    def __init__(self, budget: int, total_images: int, generator: torch.Generator):
        self.budget, self.total_images, self.generator = budget, total_images, generator
        self.images_seen = 0
        self.parts: list[Tensor] = []

    def update(self, activation: Tensor) -> None:
        """Draw this batch's share of positions from an (N, C, *) activation."""
        channels = activation.shape[1]
        values = activation.detach().transpose(0, 1).reshape(channels, -1)
        before = self.budget * self.images_seen // self.total_images
        self.images_seen += len(activation)
        quota = min(self.budget * self.images_seen // self.total_images - before, values.shape[1])
        chosen = torch.randperm(values.shape[1], generator=self.generator)[:quota]
        self.parts.append(values[:, chosen.to(values.device)].float().cpu())

    def compute(self) -> Tensor:
        """(C, S) sampled values, S <= budget."""
        return torch.cat(self.parts, dim=1)


def execution_order(
    net: nn.Module, layers: Sequence[str], example: Tensor
) -> tuple[list[str], str]:
    """The order in which ``layers`` run in ``net(example)`` (eval mode, no grad), and the name
    of the one whose output is the network's own output (``""`` when none is). Raises for a
    layer that does not run, runs twice (shared weights: its statistics would mix two
    activations) or returns something other than one tensor."""
    modules = {name: resolve_layer(net, name) for name in layers}
    with torch.no_grad(), eval_mode(net):
        order, output_layer = hooks.execution_order(net, modules, example, DIAGNOSED)
    missing = [name for name in layers if name not in order]
    if missing:
        raise ConfigError(
            f"layers {missing} of {type(net).__name__} did not run in a forward pass; "
            "diagnose only layers the forward pass runs"
        )
    return order, output_layer


def record_activations(
    net: nn.Module,
    batches: Sequence[Tensor],
    layers: Sequence[str],
    pooled: Sequence[str] = (),
    sampled: Sequence[str] = (),
    values_per_channel: int = 2000,
    seed: int = 0,
    fit_layers: Sequence[str] = (),
    fit_masks: Sequence[Tensor] = (),
    on_batch: Callable[[], None] = lambda: None,
) -> dict[str, LayerRecording]:
    """One forward pass of ``net`` (eval mode, no grad) over ``batches``, hooks on every layer
    at once: statistics of each of ``layers``, channel-pooled features of those in ``pooled``,
    up to ``values_per_channel`` sampled values per channel of those in ``sampled``, and the
    statistics of the images ``fit_masks`` selects (one boolean mask per batch) at
    ``fit_layers``. ``on_batch`` is called after every batch (a progress bar). Each
    submodule's training flag is restored afterwards.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> got = record_activations(net, [torch.randn(4, 1, 6, 6)], ["0", "1"], pooled=["1"])
        >>> got["0"].stats.count, got["1"].features.shape, got["0"].features
        (64, torch.Size([4, 2]), None)
    """
    names = list(dict.fromkeys([*layers, *fit_layers]))
    modules = {name: resolve_layer(net, name) for name in names}
    total_images = sum(len(x) for x in batches)
    accumulators = {name: ChannelStatsAccumulator() for name in layers}
    fit_accumulators = {name: ChannelStatsAccumulator() for name in fit_layers}
    fit_mask: Tensor | None = None
    features: dict[str, list[Tensor]] = {name: [] for name in pooled}
    generator = torch.Generator().manual_seed(seed)
    samplers = {name: ValueSampler(values_per_channel, total_images, generator) for name in sampled}
    ran: set[str] = set()

    def record(name: str):
        def hook(module: nn.Module, args, output) -> None:
            DIAGNOSED.one_tensor(name, module, output)
            if name in ran:
                raise DIAGNOSED.ran_twice(name)
            ran.add(name)
            if name in accumulators:
                accumulators[name].update(output)
            if name in fit_accumulators and fit_mask.any():
                fit_accumulators[name].update(output[fit_mask.to(output.device)])
            if name in features:
                features[name].append(pool_channels(output).cpu())
            if name in samplers:
                samplers[name].update(output)

        return hook

    if fit_layers and len(fit_masks) != len(batches):
        raise ConfigError(f"{len(fit_masks)} fit masks for {len(batches)} batches")
    device = device_of(net)
    with forward_hooks(modules, record), torch.no_grad(), eval_mode(net):
        for index, x in enumerate(batches):
            ran.clear()
            fit_mask = fit_masks[index] if fit_layers else None
            net(x.to(device))
            on_batch()
    return {
        name: LayerRecording(
            stats=accumulators[name].compute(within_process) if name in accumulators else None,
            features=torch.cat(features[name]) if name in features else None,
            samples=samplers[name].compute() if name in samplers else None,
            fit_stats=(
                fit_accumulators[name].compute(within_process) if name in fit_accumulators else None
            ),
        )
        for name in names
    }


def device_of(net: nn.Module) -> torch.device:
    """The device of ``net``'s first parameter (the CPU for a network without any)."""
    parameter = next(net.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")

