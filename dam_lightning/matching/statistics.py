"""Per-channel statistics of activations (channel = dim 1): the mean mu and std sigma that
Gaussian i.i.d. matching (paper, Eq. 2) equalises between F_s on source and F_t on target data,
and the two gaps that say how far apart two domains' statistics are.

Apart from the matching itself (``gaussian.py``) because the diagnosis (``dam_lightning.diagnosis``)
and the GAM module measure the same statistics without matching anything. Statistics stream in
float64 (count, sum, sum of squares) so that many batches, and the processes of a DDP run summed
by ``all_reduce_sum``, give those of one big batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dam_lightning.errors import ConfigError
from dam_lightning.matching.hooks import MATCHED, check_all_ran, eval_mode, forward_hooks
from dam_lightning.matching.taps import resolve_layer


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over torch.distributed processes when a process group is initialised, else
    return it unchanged. The input is never modified.

    Example:
        >>> all_reduce_sum(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-channel statistics of one activation (channel = dim 1).

    Attributes:
        mean: (C,) float64 mean.
        std: (C,) float64 population std (divided by the count, not count - 1).
        count: number of values per channel that went in, summed over processes.
    """

    mean: Tensor
    std: Tensor
    count: int


class ChannelStatsAccumulator:
    """Streaming per-channel count, sum and sum of squares in float64, so that statistics over
    many batches (and processes) equal those of one big batch.

    Example:
        >>> acc = ChannelStatsAccumulator()
        >>> acc.update(torch.tensor([[1.0, 10.0], [3.0, 10.0]]))
        >>> stats = acc.compute()
        >>> stats.mean.tolist(), [round(s, 6) for s in stats.std.tolist()], stats.count
        ([2.0, 10.0], [1.0, 0.0], 2)
    """

    def __init__(self):
        self._moments: Tensor | None = None  # (3, C): count, sum, sum of squares

    def update(self, activation: Tensor) -> None:
        """Add an activation of shape (N, C, *) to the running sums."""
        if activation.dim() < 2:
            raise ConfigError(
                f"an activation of shape {tuple(activation.shape)} has no channel dim (dim 1)"
            )
        channels = activation.shape[1]
        if self._moments is not None and self._moments.shape[1] != channels:
            raise ConfigError(
                f"activation has {channels} channels but earlier ones had {self._moments.shape[1]}"
            )
        # Two passes in the activation's precision (float32 at least): the per-channel mean,
        # then the norm of the centred values, which keeps the variance exact to float32 even
        # when the mean is large. Both reduce far faster than var_mean or a float64 copy of the
        # activation; the per-batch results become float64 (count, sum, sum of squares),
        # which add exactly across batches and processes.
        dims = [0, *range(2, activation.dim())]
        values = activation.detach()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        mean = values.mean(dim=dims, keepdim=True)
        squares = torch.linalg.vector_norm(values - mean, dim=dims).double().square()
        count = activation.numel() // max(channels, 1)
        mean = mean.flatten().double()
        moments = torch.stack(
            [torch.full_like(mean, count), count * mean, squares + count * mean.square()]
        )
        self._moments = moments if self._moments is None else self._moments + moments

    def compute(self, reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> ChannelStats:
        """Statistics of everything seen, after ``reduce`` has summed the stacked
        (count, sum, sum of squares) across processes; var = E[x^2] - E[x]^2 clamped at 0."""
        if self._moments is None:
            raise ConfigError("no activation was accumulated: the batches were empty")
        count, total, squares = reduce(self._moments)
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0)
        return ChannelStats(mean=mean, std=var.sqrt(), count=int(count[0].item()))


def mean_gap(target: ChannelStats, source: ChannelStats) -> float:
    """Mean over channels of |mu_t - mu_s| / pooled std (pooled std = sqrt((sigma_t^2 +
    sigma_s^2) / 2)): how far apart two domains' per-channel means are.

    Example:
        >>> s = ChannelStats(torch.zeros(2).double(), torch.ones(2).double(), 10)
        >>> t = ChannelStats(torch.ones(2).double(), torch.ones(2).double(), 10)
        >>> round(mean_gap(t, s), 6), round(mean_gap(s, s), 6)
        (1.0, 0.0)
    """
    # In units of the pooled std, not the source std alone: a channel that is constant on the
    # source (a unit that weight decay has zeroed) would otherwise swamp the average.
    pooled = (0.5 * (target.std.square() + source.std.square())).sqrt()
    return ((target.mean - source.mean).abs() / (pooled + 1e-8)).mean().item()


def std_gap(target: ChannelStats, source: ChannelStats) -> float:
    """Mean over channels of |log(sigma_t / sigma_s)| (both + 1e-8): how different two
    domains' per-channel spreads are."""
    # The 1e-8 keeps a channel that is constant in one domain finite.
    return ((target.std + 1e-8) / (source.std + 1e-8)).log().abs().mean().item()


def affine_stats(stats: ChannelStats, alpha: Tensor, beta: Tensor) -> ChannelStats:
    """Statistics of alpha * A + beta per channel, given those of A: exact, with no pass over A.

    Example:
        >>> a = ChannelStats(torch.tensor([1.0]), torch.tensor([2.0]), 5)
        >>> b = affine_stats(a, torch.tensor([-3.0]), torch.tensor([1.0]))
        >>> b.mean.tolist(), b.std.tolist(), b.count
        ([-2.0], [6.0], 5)
    """
    return ChannelStats(alpha * stats.mean + beta, alpha.abs() * stats.std, stats.count)


def measure_statistics(
    net: nn.Module,
    batches: Iterable[Tensor],
    layers: Sequence[str],
    reduce: Callable[[Tensor], Tensor] = all_reduce_sum,
) -> dict[str, ChannelStats]:
    """Stream ``batches`` through ``net`` (eval mode, no grad) and return the per-channel
    statistics of each named layer's output, summed across processes by ``reduce``. Each
    submodule's training flag is restored afterwards.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> stats = measure_statistics(net, [torch.randn(8, 3), torch.randn(4, 3)], ["0", "1"])
        >>> stats["0"].mean.shape, stats["1"].count
        (torch.Size([2]), 12)
    """
    modules = {name: resolve_layer(net, name) for name in layers}
    accumulators = {name: ChannelStatsAccumulator() for name in modules}
    ran: set[str] = set()

    def accumulate(name: str):
        def hook(module: nn.Module, args, output) -> None:
            accumulators[name].update(MATCHED.one_tensor(name, module, output))
            ran.add(name)

        return hook

    with forward_hooks(modules, accumulate), torch.no_grad(), eval_mode(net):
        for x in batches:
            net(x)
    check_all_ran(modules, ran)
    return {name: acc.compute(reduce) for name, acc in accumulators.items()}
