"""The weight-drift regulariser of GAM: how far the target network has moved from the source one.

Plain torch; the source network is a fixed reference and receives no gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from dam_lightning.errors import ConfigError

DriftReduction = Literal["mean_per_tensor", "sum"]


def weight_drift(
    target_net: nn.Module,
    source_net: nn.Module,
    reduction: DriftReduction = "mean_per_tensor",
) -> Tensor:
    """Squared distance between the parameters of ``target_net`` and ``source_net``.

    ``mean_per_tensor`` (official code): sum over parameter tensors of mean((theta_s - theta_t)^2).
    ``sum`` (paper, Eq. 3): ||theta_s - theta_t||^2 over all parameters.
    Parameters are paired by name; buffers (BatchNorm statistics) are not weights and are ignored.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> weight_drift(b, a).item()
        0.0
    """
    if reduction not in ("mean_per_tensor", "sum"):
        raise ConfigError(f"unknown drift reduction {reduction!r}: use 'mean_per_tensor' or 'sum'")
    source = dict(source_net.named_parameters())
    targets, sources = [], []
    for name, theta_t in target_net.named_parameters():
        if name not in source or source[name].shape != theta_t.shape:
            raise ConfigError(
                f"target parameter {name!r} {tuple(theta_t.shape)} has no counterpart of the same "
                "shape in the source network: the two networks must share one architecture"
            )
        targets.append(theta_t)
        sources.append(source[name])  # no gradient: _SquaredDistance returns none for it
    if not targets:
        return torch.zeros(())
    scales = [1.0 / t.numel() if reduction == "mean_per_tensor" else 1.0 for t in targets]
    return _SquaredDistance.apply(scales, *targets, *sources)


class _SquaredDistance(torch.autograd.Function):
    """sum_i scale_i * ||theta_t,i - theta_s,i||^2 in a constant number of kernels, however many
    parameter tensors there are: foreach ops forward, and the gradient written down directly,
    2 * scale_i * (theta_t,i - theta_s,i), instead of autograd's few ops per tensor (ERFNet has
    226 tensors: 2,300 ops per drift before, a GAM step's largest share outside the optimisers).
    The source tensors get no gradient."""

    @staticmethod
    def forward(ctx, scales: list[float], *tensors: Tensor) -> Tensor:
        half = len(tensors) // 2
        diffs = torch._foreach_sub(tensors[:half], tensors[half:])
        norms = torch._foreach_norm(diffs)
        # the scales as foreach scalars: no host-to-device copy (a sync on CUDA) per step
        value = torch.stack(torch._foreach_mul(torch._foreach_mul(norms, norms), scales)).sum()
        ctx.scales = scales
        ctx.diffs = diffs  # intermediates, not inputs: kept on ctx (unpacking saved tensors costs
        return value  # a detach per tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        diffs, ctx.diffs = ctx.diffs, None
        grads = torch._foreach_mul(diffs, [2.0 * s for s in ctx.scales])
        torch._foreach_mul_(grads, grad)
        return (None, *grads, *([None] * len(diffs)))
