"""Gaussian i.i.d. matching (GAM stage 2): make every channel of F_t on target data have the
mean and std of F_s on source data, by folding an affine correction into F_t's weights.

Plain torch, training-free: no Lightning, no optimiser. Corrections are applied layer by layer in
network order; each layer's target statistics are measured with earlier layers corrected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dam_lightning.matching.taps import resolve_layer

AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MATCHABLE = AFFINE_LAYERS + TRANSPOSED_LAYERS + NORM_LAYERS


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over torch.distributed processes when a process group is up, else identity."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one activation: mean and population std (float64)."""

    mean: Tensor
    std: Tensor
    count: int


class ChannelStatsAccumulator:
    """Streaming per-channel count, sum and sum of squares in float64 (channel = dim 1).

    Example:
        >>> acc = ChannelStatsAccumulator()
        >>> acc.update(torch.tensor([[1.0, 10.0], [3.0, 10.0]]))
        >>> stats = acc.compute()
        >>> stats.mean.tolist(), stats.std.tolist(), stats.count
        ([2.0, 10.0], [1.0, 0.0], 2)
    """

    def __init__(self):
        self._moments: Tensor | None = None  # rows: count, sum, sum of squares

    def update(self, activation: Tensor) -> None:
        if activation.dim() < 2:
            raise ValueError(f"activation of shape {tuple(activation.shape)} has no channel dim")
        # var_mean is one fast, numerically stable pass in the activation's dtype; its per-batch
        # results are turned into float64 sums, which add up exactly across batches and ranks.
        dims = [d for d in range(activation.dim()) if d != 1]
        var, mean = torch.var_mean(activation.detach().float(), dim=dims, correction=0)
        count = activation.numel() // activation.shape[1]
        mean, var = mean.double(), var.double()
        moments = torch.stack(
            [torch.full_like(mean, count), count * mean, count * (var + mean.pow(2))]
        )
        self._moments = moments if self._moments is None else self._moments + moments

    def compute(self, reduce: Callable[[Tensor], Tensor] = all_reduce_sum) -> ChannelStats:
        """Statistics over everything seen, summed across processes by ``reduce``."""
        if self._moments is None:
            raise ValueError("no activation was accumulated: the calibration batches are empty")
        count, total, squares = reduce(self._moments)
        mean = total / count
        var = (squares / count - mean.pow(2)).clamp_min(0)
        return ChannelStats(mean=mean, std=var.sqrt(), count=int(count[0].item()))


def foldable_layers(net: nn.Module) -> list[str]:
    """Dotted names of the layers of ``net`` a correction can be folded into, in registration
    order: BatchNorm layers, and Conv/ConvTranspose/Linear layers that have a bias (one without
    a bias is normally followed by a BatchNorm, which is matched instead)."""
    return [
        name
        for name, m in net.named_modules()
        if isinstance(m, NORM_LAYERS) or (isinstance(m, MATCHABLE) and m.bias is not None)
    ]


@dataclass
class LayerMatch:
    """What Gaussian matching did to one layer.

    ``alpha``/``beta`` are the per-channel affine correction of the layer's output. For a
    BatchNorm layer corrected by AdaBN they are the equivalent affine change of its output
    (``sqrt(rv_old + eps) / sqrt(rv_new + eps)`` and the matching shift).
    """

    name: str
    source: ChannelStats
    target_before: ChannelStats
    target_after: ChannelStats  # alpha * target_before + beta: what F_t now has on this data
    alpha: Tensor
    beta: Tensor

    @staticmethod
    def _mean_gap(target: ChannelStats, source: ChannelStats) -> float:
        pooled = (0.5 * (target.std.pow(2) + source.std.pow(2))).sqrt() + 1e-6
        return ((target.mean - source.mean).abs() / pooled).mean().item()

    @staticmethod
    def _std_gap(target: ChannelStats, source: ChannelStats) -> float:
        ratio = (target.std + 1e-6) / (source.std + 1e-6)
        return ratio.log().abs().mean().item()

    @property
    def mean_gap_before(self) -> float:
        """Mean over channels of |mu_t - mu_s| / pooled std, before the correction (the pooled
        std keeps channels that are dead on one domain from dominating the average)."""
        return self._mean_gap(self.target_before, self.source)

    @property
    def mean_gap_after(self) -> float:
        return self._mean_gap(self.target_after, self.source)

    @property
    def std_gap_before(self) -> float:
        """Mean over channels of |log(sigma_t / sigma_s)| before the correction."""
        return self._std_gap(self.target_before, self.source)

    @property
    def std_gap_after(self) -> float:
        return self._std_gap(self.target_after, self.source)


@dataclass
class GaussianMatchingReport:
    """Per-layer results of one Gaussian matching, in network order."""

    layers: dict[str, LayerMatch]

    def summary(self) -> dict[str, float]:
        """Flat ``{"mean_gap_before/<layer>": ..., ...}`` for logging."""
        out = {}
        for name, match in self.layers.items():
            for gap in ("mean_gap_before", "mean_gap_after", "std_gap_before", "std_gap_after"):
                out[f"{gap}/{name}"] = getattr(match, gap)
        return out


def measure_statistics(
    net: nn.Module,
    batches: Iterable[Tensor],
    layers: Sequence[str],
    reduce: Callable[[Tensor], Tensor] = all_reduce_sum,
) -> dict[str, ChannelStats]:
    """Stream ``batches`` through ``net`` (eval mode, no grad) and return the output statistics
    of each named layer."""
    modules = {name: resolve_layer(net, name) for name in layers}
    accumulators = {name: ChannelStatsAccumulator() for name in layers}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: accumulators[n].update(out))
        for n, m in modules.items()
    ]
    try:
        with torch.no_grad(), _eval_mode(net):
            for x in batches:
                net(x)
    finally:
        for h in handles:
            h.remove()
    return {name: acc.compute(reduce) for name, acc in accumulators.items()}


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
    """Correct ``target_net`` in place so that each matched layer's per-channel output mean and
    std on ``target_batches`` equal ``source_net``'s on ``source_batches`` (paper, Eq. 2).

    Args:
        layers: Conv/Linear/BatchNorm layers to match; default ``foldable_layers(target_net)``.
        batchnorm: ``"fold"`` folds the correction into BatchNorm's affine weights (exact);
            ``"adabn"`` instead sets its running statistics to the target statistics of its
            input (AdaBN), which matches the source only as far as F_s's own running statistics
            describe the source data.
        mode: ``"one_pass"`` runs each target batch through F_t once, all batches in
            lockstep: each layer's hook waits for every batch, folds the correction, and hands
            the corrected output on. It holds every batch's activation at the current layer and
            needs the network to run the same layers for every batch. ``"layerwise"`` streams
            the batches once per layer (less memory, more compute); same result.
        source_stats: cached ``measure_statistics(source_net, ...)``; skips the F_s pass.
        reduce: sums statistics across processes (DDP), so every rank folds the same values.
        eps: a channel with target std below ``eps`` keeps its scale (alpha = 1) and is only
            shifted: a dead channel cannot be rescaled to anything.

    Both networks run in eval mode, and every submodule's ``training`` flag is restored after.
    Parameters are changed in place (never replaced), so optimisers and DDP keep working.
    """
    names = list(layers) if layers is not None else foldable_layers(target_net)
    modules = {name: resolve_layer(target_net, name) for name in names}
    for name, module in modules.items():
        _check_matchable(name, module, batchnorm)
    if source_stats is None:
        source_stats = measure_statistics(source_net, source_batches, names, reduce)
    missing = [n for n in names if n not in source_stats]
    if missing:
        raise ValueError(f"source_stats has no statistics for layers {missing}")
    matcher = _LayerMatcher(source_stats, batchnorm, reduce, eps)
    with torch.no_grad(), _eval_mode(target_net):
        if mode == "one_pass":
            matches = _match_one_pass(target_net, modules, list(target_batches), matcher)
        elif mode == "layerwise":
            matches = _match_layerwise(target_net, modules, list(target_batches), matcher)
        else:
            raise ValueError(f"unknown mode {mode!r}: use 'one_pass' or 'layerwise'")
    return GaussianMatchingReport(matches)


class _LayerMatcher:
    """Turns one layer's target statistics into a correction, folds it, reports it."""

    def __init__(self, source_stats, batchnorm: str, reduce, eps: float):
        self.source_stats = source_stats
        self.batchnorm = batchnorm
        self.reduce = reduce
        self.eps = eps

    def uses_input(self, module: nn.Module) -> bool:
        """AdaBN measures a BatchNorm's input; everything else is measured at the output."""
        return isinstance(module, NORM_LAYERS) and self.batchnorm == "adabn"

    def correct(self, name: str, module: nn.Module, stats: ChannelStats) -> tuple[Tensor, Tensor]:
        """Fold the correction for ``stats`` (this layer's output statistics on the target
        calibration data) into ``module``; return the per-channel (alpha, beta), float64."""
        source = self.source_stats[name]
        alpha = torch.where(
            stats.std < self.eps, torch.ones_like(stats.std), source.std / stats.std
        )
        beta = source.mean - alpha * stats.mean
        _fold(module, alpha, beta)
        return alpha, beta

    def report(self, name, before: ChannelStats, alpha, beta) -> LayerMatch:
        after = _affine(before, alpha, beta)
        return LayerMatch(name, self.source_stats[name], before, after, alpha, beta)


def _match_one_pass(net, modules, batches, matcher) -> dict[str, LayerMatch]:
    """One forward pass per calibration batch, all batches in lockstep: each matched layer's
    hook waits until every batch has reached the layer, folds the correction computed from all
    of their outputs, and hands each batch its corrected output, so later layers are measured
    on corrected inputs. Costs one forward pass over the calibration batches."""
    if not batches:
        raise ValueError("no target calibration batch was given")
    matches: dict[str, LayerMatch] = {}
    lockstep = _Lockstep(len(batches))

    def correct_layer(name, module, outputs):
        if name in matches:
            raise ValueError(
                f"layer {name!r} ran twice in one forward pass (shared weights?): its "
                "correction cannot be folded once; match a layer that runs once"
            )
        before = _stats_of(outputs, matcher.reduce)
        alpha, beta = matcher.correct(name, module, before)
        matches[name] = matcher.report(name, before, alpha, beta)
        return alpha, beta

    def adabn_layer(name, module, inputs):
        stats = _stats_of(inputs, matcher.reduce)
        before = _batchnorm_output_stats(module, stats)
        alpha, beta = _adabn(module, stats)
        matches[name] = matcher.report(name, before, alpha, beta)

    def output_hook(name):
        def hook(module, args, output):
            alpha, beta = lockstep.rendezvous(output, lambda o: correct_layer(name, module, o))
            return _apply_(output, alpha, beta)

        return hook

    def adabn_pre_hook(name):
        def hook(module, args):  # new running stats before BatchNorm normalises its input
            lockstep.rendezvous(args[0], lambda inputs: adabn_layer(name, module, inputs))

        return hook

    handles = []
    for name, module in modules.items():
        if matcher.uses_input(module):
            handles.append(module.register_forward_pre_hook(adabn_pre_hook(name)))
        else:
            handles.append(module.register_forward_hook(output_hook(name)))
    try:
        lockstep.run(net, batches)
    finally:
        for h in handles:
            h.remove()
    _check_all_ran(modules, matches)
    return matches


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    """A thread pool kept across calls: a new thread pays to start its own intra-op thread
    team on its first operation, which would cost more than the matching itself on a CPU."""
    global _EXECUTOR
    if _EXECUTOR is None or _EXECUTOR._max_workers < workers:
        if _EXECUTOR is not None:
            _EXECUTOR.shutdown(wait=False)
        _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gaussian-match")
    return _EXECUTOR


class _Aborted(Exception):
    """Raised in the waiting threads of a lockstep run when another thread failed."""


class _Lockstep:
    """Run ``net(batch)`` for every batch, each in a thread, the threads taking turns (only one
    computes at a time: cache-friendly, no oversubscription). A hook that calls ``rendezvous``
    pauses its batch until all batches have reached the same point; the last one to arrive runs
    ``on_all`` over everything gathered, and each batch then continues with its result.

    This is how a forward pass can be paused at a layer without knowing the network's code.
    """

    def __init__(self, count: int):
        self.count = count
        self.turn = 0
        self.condition = threading.Condition()
        self.errors: list[BaseException] = []
        self.local = threading.local()
        self.gathered: list[Tensor] = []
        self.result = None

    def run(self, net: nn.Module, batches: list[Tensor]) -> None:
        futures = [
            _executor(len(batches)).submit(self._forward, net, x, slot)
            for slot, x in enumerate(batches)
        ]
        for future in futures:
            future.result()
        real = [e for e in self.errors if not isinstance(e, _Aborted)]
        if real:
            raise real[0]

    def _forward(self, net: nn.Module, x: Tensor, slot: int) -> None:
        self.local.slot = slot
        try:
            self._wait_for_turn(slot)
            with torch.no_grad():  # grad mode is per thread
                net(x)
            self._pass_turn()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            with self.condition:
                self.errors.append(error)
                self.condition.notify_all()

    def rendezvous(self, value: Tensor, on_all):
        slot = self.local.slot
        self.gathered.append(value)
        if slot == self.count - 1:
            gathered, self.gathered = self.gathered, []
            self.result = on_all(gathered)
        self._pass_turn()
        self._wait_for_turn(slot)
        return self.result

    def _wait_for_turn(self, slot: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.turn == slot or self.errors)
            if self.errors:
                raise _Aborted

    def _pass_turn(self) -> None:
        with self.condition:
            self.turn = (self.turn + 1) % self.count
            self.condition.notify_all()


def _match_layerwise(net, modules, batches, matcher) -> dict[str, LayerMatch]:
    """One truncated pass over the batches per layer, in the order the layers run."""
    if not batches:
        raise ValueError("no target calibration batch was given")
    matches: dict[str, LayerMatch] = {}
    for name in _execution_order(net, modules, batches[0]):
        module = modules[name]
        before = _stats_of(_collect(net, module, batches, want_input=False), matcher.reduce)
        if matcher.uses_input(module):
            inputs = _collect(net, module, batches, want_input=True)
            alpha, beta = _adabn(module, _stats_of(inputs, matcher.reduce))
        else:
            alpha, beta = matcher.correct(name, module, before)
        matches[name] = matcher.report(name, before, alpha, beta)
    return matches


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted layer has run."""


def _collect(net, module, batches, want_input: bool) -> Tensor:
    """The input or output of ``module`` for every batch, stopping each forward right there."""
    captured = []

    def hook(mod, args, output):
        captured.append(args[0] if want_input else output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        for x in batches:
            try:
                net(x)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError(f"{type(module).__name__} layer was not called in the forward pass")
    return torch.cat(captured)


def _execution_order(net, modules, example: Tensor) -> list[str]:
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: order.append(n))
        for n, m in modules.items()
    ]
    try:
        net(example)
    finally:
        for h in handles:
            h.remove()
    repeated = sorted({n for n in order if order.count(n) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} ran twice in one forward pass (shared weights?)")
    _check_all_ran(modules, order)
    return order


def _check_all_ran(modules, ran) -> None:
    missing = [n for n in modules if n not in ran]
    if missing:
        raise ValueError(f"layers {missing} were not called during the forward pass")


def _stats_of(activations: Tensor | list[Tensor], reduce) -> ChannelStats:
    acc = ChannelStatsAccumulator()
    for activation in activations if isinstance(activations, list) else [activations]:
        acc.update(activation)
    return acc.compute(reduce)


def _affine(stats: ChannelStats, alpha: Tensor, beta: Tensor) -> ChannelStats:
    """Statistics of ``alpha * A + beta`` given those of ``A``."""
    return ChannelStats(alpha * stats.mean + beta, alpha.abs() * stats.std, stats.count)


def _apply_(output: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """alpha * output + beta per channel (dim 1), in place."""
    shape = (1, -1) + (1,) * (output.dim() - 2)
    return output.mul_(alpha.to(output.dtype).view(shape)).add_(beta.to(output.dtype).view(shape))


def _batchnorm_output_stats(module: nn.Module, inputs: ChannelStats) -> ChannelStats:
    """Statistics of an eval-mode BatchNorm's output, from those of its input."""
    scale = (module.running_var.double() + module.eps).rsqrt()
    gamma = module.weight.double() if module.affine else torch.ones_like(scale)
    shift = module.bias.double() if module.affine else torch.zeros_like(scale)
    alpha = gamma * scale
    return _affine(inputs, alpha, shift - alpha * module.running_mean.double())


def _fold(module: nn.Module, alpha: Tensor, beta: Tensor) -> None:
    """W_k <- alpha_k W_k, b_k <- alpha_k b_k + beta_k, in place."""
    weight, bias = module.weight, module.bias
    dim = 1 if isinstance(module, TRANSPOSED_LAYERS) else 0  # the output-channel dim
    shape = [1] * weight.dim()
    shape[dim] = -1
    weight.mul_(alpha.to(weight.dtype).view(shape))
    bias.mul_(alpha.to(bias.dtype)).add_(beta.to(bias.dtype))


def _adabn(module: nn.Module, stats: ChannelStats) -> tuple[Tensor, Tensor]:
    """Set a BatchNorm's running statistics to the target statistics of its input (AdaBN).

    Returns the equivalent per-channel affine change of the layer's output.
    """
    eps = module.eps
    old_mean = module.running_mean.double()
    old_scale = (module.running_var.double() + eps).sqrt()
    new_var = stats.std.pow(2)
    new_scale = (new_var + eps).sqrt()
    gamma = module.weight.double() if module.affine else torch.ones_like(old_mean)
    shift = module.bias.double() if module.affine else torch.zeros_like(old_mean)
    alpha = old_scale / new_scale
    beta = gamma * (old_mean - stats.mean) / new_scale + shift * (1 - alpha)
    module.running_mean.copy_(stats.mean.to(module.running_mean.dtype))
    module.running_var.copy_(new_var.to(module.running_var.dtype))
    return alpha, beta


def _check_matchable(name: str, module: nn.Module, batchnorm: str) -> None:
    if batchnorm not in ("fold", "adabn"):
        raise ValueError(f"unknown batchnorm mode {batchnorm!r}: use 'fold' or 'adabn'")
    if not isinstance(module, MATCHABLE):
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}; Gaussian matching folds corrections "
            "into Conv, ConvTranspose, Linear and BatchNorm layers. To match an activation after "
            "a ReLU, name the Conv/Linear before it"
        )
    if isinstance(module, NORM_LAYERS):
        if batchnorm == "fold" and not module.affine:
            raise ValueError(
                f"BatchNorm layer {name!r} has affine=False, so there is no weight to fold the "
                "correction into; use batchnorm='adabn'"
            )
        if batchnorm == "adabn" and module.running_mean is None:
            raise ValueError(f"BatchNorm layer {name!r} tracks no running statistics for AdaBN")
    elif module.bias is None:
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has no bias to add the mean correction "
            "to; build it with bias=True, or match the BatchNorm that follows it"
        )
    if isinstance(module, TRANSPOSED_LAYERS) and module.groups != 1:
        raise ValueError(f"layer {name!r}: grouped transposed convolutions cannot be folded")


@contextmanager
def _eval_mode(net: nn.Module):
    """Eval mode for the duration; each submodule's own training flag is restored after."""
    flags = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag
