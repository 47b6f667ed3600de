"""Gaussian i.i.d. matching (GAM stage 2): give every channel of F_t on target data the mean and
std of F_s on source data, by folding a per-channel affine correction into F_t's weights.

Paper, Eq. 2: alpha = sigma_s / sigma_t, beta = mu_s - alpha * mu_t, folded into a Conv/Linear as
W_k <- alpha_k W_k, b_k <- alpha_k b_k + beta_k, into a BatchNorm's gamma/beta the same way, or,
with AdaBN, into a BatchNorm's running statistics. This file holds that algebra and the checks
of which layers can take it; the statistics are ``statistics.py``'s and the forwards that measure
them are scheduled by ``engine.py``.

Plain torch and training-free: no Lightning import, no optimiser, no gradient. It changes only the
matched layers' parameters (and, for AdaBN, running statistics) of the target network, in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dam_lightning.errors import ConfigError
from dam_lightning.matching.engine import layerwise, one_pass
from dam_lightning.matching.hooks import eval_mode
from dam_lightning.matching.statistics import (
    ChannelStats,
    affine_stats,
    all_reduce_sum,
    mean_gap,
    measure_statistics,
    std_gap,
)
from dam_lightning.matching.taps import resolve_layer

WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# _BatchNorm, not BatchNorm{1,2,3}d: nn.SyncBatchNorm (a sync_batchnorm run) derives only from it.
BATCHNORM_LAYERS = (_BatchNorm,)
MATCHABLE_LAYERS = WEIGHTED_LAYERS + TRANSPOSED_CONV_LAYERS + BATCHNORM_LAYERS


def foldable_layers(net: nn.Module) -> list[str]:
    """Dotted names of the layers of ``net`` a correction can be folded into, in registration
    order: every Conv{1,2,3}d / ConvTranspose{1,2,3}d / Linear with a bias, and every BatchNorm
    (BatchNorm{1,2,3}d, SyncBatchNorm). A Conv/Linear without a bias is left out: it normally
    feeds a BatchNorm, which is matched instead (its output is that layer's output up to an
    affine map). So is a grouped transposed convolution, which ``gaussian_match`` refuses.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(4, 2))
        >>> foldable_layers(net)
        ['1', '4']
    """
    return [name for name, module in net.named_modules() if _is_foldable(module)]


def _is_foldable(module: nn.Module) -> bool:
    """Whether ``module`` has parameters a correction folds into: a BatchNorm, or a
    Conv/ConvTranspose/Linear with a bias that ``_check_matchable`` accepts. (Whether a
    BatchNorm suits ``batchnorm="fold"`` or ``"adabn"`` is checked once that is known.)"""
    if isinstance(module, BATCHNORM_LAYERS):
        return True
    if not isinstance(module, MATCHABLE_LAYERS) or module.bias is None:
        return False
    return not _is_grouped_transposed(module)


def _is_grouped_transposed(module: nn.Module) -> bool:
    # Its weight is (in, out / groups, ...): output channels span dims 0 and 1, so a
    # per-output-channel scale is not one broadcast along dim 1 (see _fold_correction).
    return isinstance(module, TRANSPOSED_CONV_LAYERS) and module.groups != 1


@dataclass
class LayerMatch:
    """What Gaussian matching did to one layer.

    ``alpha``/``beta`` ((C,) float64) are the per-channel affine change of the layer's output on
    the target data: ``A_t <- alpha * A_t + beta``. For a BatchNorm layer adapted by AdaBN they
    are the affine change that the new running statistics make to its output (the weights are
    untouched; see ``gaussian_match``).
    """

    name: str
    source: ChannelStats
    target_before: ChannelStats
    target_after: ChannelStats
    alpha: Tensor
    beta: Tensor

    @property
    def mean_gap_before(self) -> float:
        """Mean over channels of |mu_t - mu_s| / pooled std, before the correction (pooled std =
        sqrt((sigma_t^2 + sigma_s^2) / 2))."""
        return mean_gap(self.target_before, self.source)

    @property
    def mean_gap_after(self) -> float:
        """Mean over channels of |mu_t - mu_s| / pooled std, after the correction."""
        return mean_gap(self.target_after, self.source)

    @property
    def std_gap_before(self) -> float:
        """Mean over channels of |log(sigma_t / sigma_s)| (both + 1e-8), before the correction."""
        return std_gap(self.target_before, self.source)

    @property
    def std_gap_after(self) -> float:
        """Mean over channels of |log(sigma_t / sigma_s)| (both + 1e-8), after the correction."""
        return std_gap(self.target_after, self.source)


@dataclass
class GaussianMatchingReport:
    """Per-layer results of one Gaussian matching, in network (execution) order."""

    layers: dict[str, LayerMatch]

    def summary(self) -> dict[str, float]:
        """Flat ``{"mean_gap_before/<layer>": ..., "std_gap_after/<layer>": ..., ...}`` for
        logging: four gaps per matched layer."""
        gaps = ("mean_gap_before", "mean_gap_after", "std_gap_before", "std_gap_after")
        return {
            f"{gap}/{name}": getattr(match, gap)
            for name, match in self.layers.items()
            for gap in gaps
        }


def gaussian_match(
    source_net: nn.Module,
    target_net: nn.Module,
    source_batches: Iterable[Tensor],
    target_batches: Iterable[Tensor],
    layers: Sequence[str] | None = None,
    batchnorm: Literal["fold", "adabn"] = "fold",
    mode: Literal["one_pass", "layerwise"] = "one_pass",
    source_stats: dict[str, ChannelStats] | None = None,
    reduce: Callable[[Tensor], Tensor] = all_reduce_sum,
    eps: float = 1e-5,
) -> GaussianMatchingReport:
    """Correct ``target_net`` in place so that, layer by layer in network order, each matched
    layer's per-channel output mean and std on ``target_batches`` equal those of ``source_net``
    on ``source_batches`` (paper, Eq. 2): alpha = sigma_s / sigma_t, beta = mu_s - alpha * mu_t,
    folded as W_k <- alpha_k W_k, b_k <- alpha_k b_k + beta_k.

    Args:
        source_net: the frozen F_s; only read.
        target_net: F_t; its matched layers' parameters change in place (the Parameter objects
            stay the same, so optimisers and DDP keep working). No parameter is created.
        source_batches, target_batches: input tensors on the networks' device; each iterable
            is consumed once.
        layers: dotted names of Conv/ConvTranspose/Linear/BatchNorm layers to match; default
            ``foldable_layers(target_net)``.
        batchnorm: ``"fold"`` folds the correction of a BatchNorm's output into its gamma and
            beta (exact). ``"adabn"`` (AdaBN) leaves gamma/beta alone and sets its running
            mean/var to the mean/population variance of its input on the target data; the
            report's alpha/beta then hold the equivalent affine change of its output. Its
            output on the target data then has mean beta and std |gamma| (times
            sqrt(var / (var + eps))): the source statistics only where F_s's running statistics
            are those of the source data. Conv/Linear layers are folded in both treatments.
        mode: ``"one_pass"`` runs each target batch through F_t once, all batches in
            lockstep: each matched layer's hook waits until every batch has reached it,
            measures its output over all of them, folds the correction and hands each batch
            its corrected output, so later layers are measured on corrected inputs. About one
            forward pass over the calibration batches; the paused forwards hold every batch's
            activation at the current layer (memory grows with the number of batches), and
            the network must run the same matched layers for every batch. ``"layerwise"``
            streams the batches once per layer, each forward stopped right after that layer:
            memory of one batch's forward whatever their number, more compute, the same
            weights. Both run every forward under the caller's autocast, CUDA device and
            stream, and call ``reduce`` from the calling thread only.
        source_stats: cached ``measure_statistics(source_net, source_batches, layers)``; when
            given, F_s is not run and ``source_batches`` is not read.
        reduce: sums the statistics across processes (DDP), so every rank folds the same values.
        eps: a target channel with std below ``eps`` (dead) keeps its scale (alpha = 1) and is
            only shifted to the source mean: a constant cannot be stretched to a spread.

    Returns:
        The per-layer report. ``target_after`` holds the statistics of the corrected output on
        the same data: the exact statistics of alpha * A_t + beta, derived from ``target_before``
        (no second pass). For an AdaBN layer both are derived from its input statistics, with
        the old and the new running statistics.

    Both networks run in eval mode under ``torch.no_grad()``; every submodule's training flag is
    restored afterwards. If matching fails part-way (e.g. a layer runs twice: shared weights),
    the matched layers' parameters and buffers are restored before the error propagates.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> source_net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> target_net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> xs, xt = [torch.randn(64, 3)], [3 * torch.randn(64, 3) + 1]
        >>> report = gaussian_match(source_net, target_net, xs, xt)
        >>> list(report.layers), round(report.layers["2"].std_gap_after, 6)
        (['0', '2'], 0.0)
    """
    if mode not in ("one_pass", "layerwise"):
        raise ConfigError(f"unknown mode {mode!r}: use 'one_pass' or 'layerwise'")
    if batchnorm not in ("fold", "adabn"):
        raise ConfigError(f"unknown batchnorm {batchnorm!r}: use 'fold' or 'adabn'")
    names = list(layers) if layers is not None else foldable_layers(target_net)
    if not names:
        raise ConfigError(
            f"no layer to match in {type(target_net).__name__}: name Conv/Linear/BatchNorm "
            "layers in `layers`"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"layer names must be unique, got {names}")
    modules = {name: resolve_layer(target_net, name) for name in names}
    for name, module in modules.items():
        _check_matchable(name, module, batchnorm)
    # A sequence is used as it is (e.g. batches kept on the CPU that move to the device when
    # read), so that layerwise matching holds one batch on the device at a time.
    calibration = target_batches if isinstance(target_batches, Sequence) else list(target_batches)
    if len(calibration) == 0:
        raise ConfigError("no target calibration batch was given")

    with torch.no_grad(), eval_mode(source_net, target_net):
        if source_stats is None:
            source_stats = measure_statistics(source_net, source_batches, names, reduce)
        missing = [name for name in names if name not in source_stats]
        if missing:
            raise ConfigError(f"source_stats has no statistics for layers {missing}")
        plan = MatchingPlan(source_stats, batchnorm, reduce, eps)
        engine = one_pass if mode == "one_pass" else layerwise
        with _restored_on_error(modules.values()):
            matches = engine(target_net, modules, calibration, plan)
    return GaussianMatchingReport(matches)


@dataclass(frozen=True)
class MatchingPlan:
    """What both engines (``engine.one_pass``, ``engine.layerwise``) share: how a layer's target
    statistics become its correction (Eq. 2, folded; or AdaBN) and its ``LayerMatch``."""

    source_stats: dict[str, ChannelStats]
    batchnorm: str
    reduce: Callable[[Tensor], Tensor]
    eps: float

    def adapts_batchnorm(self, module: nn.Module) -> bool:
        """AdaBN measures a BatchNorm's input; every other layer is measured at its output."""
        return self.batchnorm == "adabn" and isinstance(module, BATCHNORM_LAYERS)

    @staticmethod
    def channel_checked(name: str, module: nn.Module, activation: Tensor) -> Tensor:
        """``activation``, after checking that dim 1 holds the layer's channels (a Linear
        applied to (N, L, features) has its channels last, which per-channel matching cannot
        handle)."""
        expected = _output_channels(module)
        if activation.dim() < 2 or activation.shape[1] != expected:
            raise ConfigError(
                f"layer {name!r} ({type(module).__name__}) has {expected} channels but its "
                f"activation has shape {tuple(activation.shape)}; Gaussian matching needs the "
                "channels in dim 1, as in (N, C) or (N, C, ...)"
            )
        return activation

    def source(self, name: str, target: ChannelStats) -> ChannelStats:
        """The source statistics of layer ``name``, on the target statistics' device."""
        source = self.source_stats[name]
        if source.mean.shape != target.mean.shape:
            raise ConfigError(
                f"layer {name!r} has {target.mean.numel()} channels on F_t but the source "
                f"statistics have {source.mean.numel()}: were source_stats measured on "
                "another network?"
            )
        device = target.mean.device
        return ChannelStats(source.mean.to(device), source.std.to(device), source.count)

    def correct(self, name: str, module: nn.Module, before: ChannelStats) -> LayerMatch:
        """Compute Eq. 2 for layer ``name`` from its target output statistics ``before`` and
        fold it into the layer's weights. The statistics after are those of alpha * A_t + beta,
        derived (exact, and no second statistics pass)."""
        alpha, beta = _affine_correction(self.source(name, before), before, self.eps)
        _fold_correction(module, alpha, beta)
        return self._report(name, before, affine_stats(before, alpha, beta), alpha, beta)

    def adapt(
        self,
        name: str,
        module: nn.Module,
        inputs: ChannelStats,
        measured: ChannelStats | None = None,
    ) -> LayerMatch:
        """AdaBN for BatchNorm ``name`` from the target statistics of its input. ``measured``:
        its output statistics measured with the old running statistics (``layerwise``); without
        them (``one_pass``, where the output is only ever computed with the new ones) the
        statistics before and after are both derived from ``inputs``."""
        if measured is None:
            before = _batchnorm_output_stats(module, inputs)
            alpha, beta = _adapt_batchnorm(module, inputs)
            after = _batchnorm_output_stats(module, inputs)
        else:
            before = measured
            alpha, beta = _adapt_batchnorm(module, inputs)
            after = affine_stats(before, alpha, beta)
        return self._report(name, before, after, alpha, beta)

    def _report(
        self, name: str, before: ChannelStats, after: ChannelStats, alpha: Tensor, beta: Tensor
    ) -> LayerMatch:
        return LayerMatch(name, self.source(name, before), before, after, alpha, beta)


def _output_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, BATCHNORM_LAYERS):
        return module.num_features
    return module.out_channels


def _affine_correction(
    source: ChannelStats, target: ChannelStats, eps: float
) -> tuple[Tensor, Tensor]:
    """Eq. 2: alpha = sigma_s / sigma_t, beta = mu_s - alpha mu_t; alpha = 1 on a dead target
    channel (sigma_t < eps), which is then only shifted."""
    alive = target.std >= eps
    alpha = torch.where(alive, source.std / target.std.clamp_min(eps), torch.ones_like(target.std))
    return alpha, source.mean - alpha * target.mean


def _fold_correction(module: nn.Module, alpha: Tensor, beta: Tensor) -> None:
    """W_k <- alpha_k W_k, b_k <- alpha_k b_k + beta_k, in place. A BatchNorm's gamma/beta are
    its W/b (its eval-mode output is gamma * x_hat + beta); a transposed convolution keeps its
    output channels in weight dim 1."""
    weight, bias = module.weight, module.bias
    shape = [1] * weight.dim()
    shape[1 if isinstance(module, TRANSPOSED_CONV_LAYERS) else 0] = -1
    weight.mul_(alpha.to(weight).view(shape))
    bias.copy_(alpha * bias.double() + beta)
    # Autocast caches its low-precision copy of a parameter until the region ends, blind to
    # in-place changes: drop it, or the next forward in this thread would use the old weights.
    torch.clear_autocast_cache()


def _batchnorm_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm: y = scale * x + shift per channel, float64."""
    inv_std = (module.running_var.double() + module.eps).rsqrt()
    if not module.affine:
        return inv_std, -inv_std * module.running_mean.double()
    scale = module.weight.double() * inv_std
    return scale, module.bias.double() - scale * module.running_mean.double()


def _batchnorm_output_stats(module: nn.Module, inputs: ChannelStats) -> ChannelStats:
    """Statistics of an eval-mode BatchNorm's output, given those of its input."""
    return affine_stats(inputs, *_batchnorm_affine(module))


def _adapt_batchnorm(module: nn.Module, inputs: ChannelStats) -> tuple[Tensor, Tensor]:
    """AdaBN: set the running statistics to the target statistics of the BatchNorm's input.
    Returns (alpha, beta) with new output = alpha * old output + beta, per channel."""
    old_std = (module.running_var.double() + module.eps).sqrt()
    _, old_shift = _batchnorm_affine(module)
    module.running_mean.copy_(inputs.mean)
    module.running_var.copy_(inputs.std.square())
    _, new_shift = _batchnorm_affine(module)
    # alpha is written with the running stds, not scale ratios, so gamma = 0 stays finite.
    alpha = old_std / (module.running_var.double() + module.eps).sqrt()
    return alpha, new_shift - alpha * old_shift


def _check_matchable(name: str, module: nn.Module, batchnorm: str) -> None:
    """Refuse, with the fix, a layer whose correction cannot be folded into its parameters."""
    kind = type(module).__name__
    if not isinstance(module, MATCHABLE_LAYERS):
        raise ConfigError(
            f"layer {name!r} is a {kind}, which has no weights to fold a correction into; "
            "Gaussian matching corrects Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d and "
            "BatchNorm (1d/2d/3d, SyncBatchNorm) layers. To match an activation after a ReLU (or "
            "another parameter-free layer), name the Conv/Linear before it"
        )
    if isinstance(module, BATCHNORM_LAYERS):
        if batchnorm == "fold" and not module.affine:
            raise ConfigError(
                f"BatchNorm layer {name!r} has affine=False, so there is no gamma/beta to fold "
                "the correction into; pass batchnorm='adabn', or build it with affine=True"
            )
        if batchnorm == "adabn" and module.running_mean is None:
            raise ConfigError(
                f"BatchNorm layer {name!r} tracks no running statistics "
                "(track_running_stats=False), so AdaBN has nothing to adapt; pass "
                "batchnorm='fold' or leave it out of `layers`"
            )
        return
    if module.bias is None:
        raise ConfigError(
            f"layer {name!r} ({kind}) has no bias to take the mean correction; build it "
            "with bias=True, or match the BatchNorm that follows it instead"
        )
    if _is_grouped_transposed(module):
        raise ConfigError(
            f"layer {name!r} ({kind}) has groups={module.groups}; only transposed "
            "convolutions with groups=1 can be folded: leave it out of `layers`"
        )


@contextmanager
def _restored_on_error(modules: Iterable[nn.Module]):
    """Copy the modules' parameters and buffers back if the block fails, so a failed matching
    (a layer found running twice only after earlier layers were folded) leaves F_t unchanged."""
    saved = [
        (tensor, tensor.detach().clone())
        for module in modules
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    ]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        torch.clear_autocast_cache()  # as in _fold_correction
        raise
