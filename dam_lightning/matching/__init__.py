"""The paper's algorithm in plain torch: taps, per-channel statistics, Gaussian matching,
discriminators, weight drift.

Nothing in this package imports Lightning; it can be used in any training loop.
"""

from dam_lightning.matching.adversarial import (
    GANLoss,
    MLPDiscriminator,
    PatchDiscriminator,
    discriminator_for,
)
from dam_lightning.matching.drift import weight_drift
from dam_lightning.matching.gaussian import GaussianMatchingReport, foldable_layers, gaussian_match
from dam_lightning.matching.hooks import eval_mode
from dam_lightning.matching.statistics import (
    ChannelStats,
    ChannelStatsAccumulator,
    mean_gap,
    measure_statistics,
    std_gap,
)
from dam_lightning.matching.taps import ActivationTaps, resolve_layer

__all__ = [
    "ActivationTaps",
    "ChannelStats",
    "ChannelStatsAccumulator",
    "GANLoss",
    "GaussianMatchingReport",
    "MLPDiscriminator",
    "PatchDiscriminator",
    "discriminator_for",
    "eval_mode",
    "foldable_layers",
    "gaussian_match",
    "mean_gap",
    "measure_statistics",
    "resolve_layer",
    "std_gap",
    "weight_drift",
]
