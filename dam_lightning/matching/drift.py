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
    terms = []
    for name, theta_t in target_net.named_parameters():
        if name not in source or source[name].shape != theta_t.shape:
            raise ConfigError(
                f"target parameter {name!r} {tuple(theta_t.shape)} has no counterpart of the same "
                "shape in the source network: the two networks must share one architecture"
            )
        squared = (theta_t - source[name].detach()).pow(2)
        terms.append(squared.mean() if reduction == "mean_per_tensor" else squared.sum())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
