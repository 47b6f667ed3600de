"""Gaussian i.i.d. matching (GAM stage 2): give every channel of F_t on target data the mean and
std of F_s on source data, by folding a per-channel affine correction into F_t's weights.

Plain torch and training-free: no Lightning import, no optimiser, no gradient. It changes only the
matched layers' parameters (and, for AdaBN, running statistics) of the target network, in place.
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
from torch.nn.modules.batchnorm import _BatchNorm

from dam_lightning.matching.taps import resolve_layer

WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# _BatchNorm, not BatchNorm{1,2,3}d: nn.SyncBatchNorm (a sync_batchnorm run) derives only from it.
BATCHNORM_LAYERS = (_BatchNorm,)
MATCHABLE_LAYERS = WEIGHTED_LAYERS + TRANSPOSED_CONV_LAYERS + BATCHNORM_LAYERS


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
            raise ValueError(
                f"an activation of shape {tuple(activation.shape)} has no channel dim (dim 1)"
            )
        channels = activation.shape[1]
        if self._moments is not None and self._moments.shape[1] != channels:
            raise ValueError(
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
            raise ValueError("no activation was accumulated: the batches were empty")
        count, total, squares = reduce(self._moments)
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0)
        return ChannelStats(mean=mean, std=var.sqrt(), count=int(count[0].item()))


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
            accumulators[name].update(_single_tensor(name, module, output))
            ran.add(name)

        return hook

    handles = [m.register_forward_hook(accumulate(n)) for n, m in modules.items()]
    try:
        with torch.no_grad(), eval_mode(net):
            for x in batches:
                net(x)
    finally:
        for handle in handles:
            handle.remove()
    _check_all_ran(modules, ran)
    return {name: acc.compute(reduce) for name, acc in accumulators.items()}


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
            forward pass over the calibration batches; it holds every batch's activation at
            the current layer, and needs the network to run the same matched layers for every
            batch. ``"layerwise"`` streams the batches once per layer, each forward stopped
            right after that layer: less memory, more compute, the same weights.
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
        raise ValueError(f"unknown mode {mode!r}: use 'one_pass' or 'layerwise'")
    if batchnorm not in ("fold", "adabn"):
        raise ValueError(f"unknown batchnorm {batchnorm!r}: use 'fold' or 'adabn'")
    names = list(layers) if layers is not None else foldable_layers(target_net)
    if not names:
        raise ValueError(
            f"no layer to match in {type(target_net).__name__}: name Conv/Linear/BatchNorm "
            "layers in `layers`"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique, got {names}")
    modules = {name: resolve_layer(target_net, name) for name in names}
    for name, module in modules.items():
        _check_matchable(name, module, batchnorm)
    # A sequence is used as it is (e.g. batches kept on the CPU that move to the device when
    # read), so that layerwise matching holds one batch on the device at a time.
    calibration = target_batches if isinstance(target_batches, Sequence) else list(target_batches)
    if len(calibration) == 0:
        raise ValueError("no target calibration batch was given")

    with torch.no_grad(), eval_mode(source_net, target_net):
        if source_stats is None:
            source_stats = measure_statistics(source_net, source_batches, names, reduce)
        missing = [name for name in names if name not in source_stats]
        if missing:
            raise ValueError(f"source_stats has no statistics for layers {missing}")
        plan = _MatchingPlan(source_stats, batchnorm, reduce, eps)
        match_all = _match_one_pass if mode == "one_pass" else _match_layerwise
        with _restored_on_error(modules.values()):
            matches = match_all(target_net, modules, calibration, plan)
    return GaussianMatchingReport(matches)


@dataclass(frozen=True)
class _MatchingPlan:
    """What both modes share: how a layer's target statistics become a correction."""

    source_stats: dict[str, ChannelStats]
    batchnorm: str
    reduce: Callable[[Tensor], Tensor]
    eps: float

    def adapts_batchnorm(self, module: nn.Module) -> bool:
        """AdaBN measures a BatchNorm's input; every other layer is measured at its output."""
        return self.batchnorm == "adabn" and isinstance(module, BATCHNORM_LAYERS)

    def statistics(self, name: str, module: nn.Module, activations: list[Tensor]) -> ChannelStats:
        """Statistics of layer ``name``'s activations (one per batch), reduced across
        processes."""
        accumulator = ChannelStatsAccumulator()
        for activation in activations:
            accumulator.update(_channel_checked(name, module, activation))
        return accumulator.compute(self.reduce)

    def source(self, name: str, target: ChannelStats) -> ChannelStats:
        """The source statistics of layer ``name``, on the target statistics' device."""
        source = self.source_stats[name]
        if source.mean.shape != target.mean.shape:
            raise ValueError(
                f"layer {name!r} has {target.mean.numel()} channels on F_t but the source "
                f"statistics have {source.mean.numel()}: were source_stats measured on "
                "another network?"
            )
        device = target.mean.device
        return ChannelStats(source.mean.to(device), source.std.to(device), source.count)

    def correct(self, name: str, module: nn.Module, target: ChannelStats) -> tuple[Tensor, Tensor]:
        """Compute Eq. 2 for layer ``name`` from its target output statistics and fold it
        into the layer's weights; return (alpha, beta)."""
        alpha, beta = _affine_correction(self.source(name, target), target, self.eps)
        _fold_correction(module, alpha, beta)
        return alpha, beta

    def report(
        self, name: str, before: ChannelStats, after: ChannelStats, alpha: Tensor, beta: Tensor
    ) -> LayerMatch:
        """The LayerMatch of layer ``name``."""
        return LayerMatch(name, self.source(name, before), before, after, alpha, beta)


def _match_one_pass(net, modules, batches, plan: _MatchingPlan) -> dict[str, LayerMatch]:
    """Each calibration batch runs through F_t once, all batches in lockstep (``_Lockstep``): a
    matched layer's hook waits until every batch has reached the layer, corrects the layer from
    all of their outputs, and hands each batch its corrected output, so every later layer is
    measured with earlier ones already corrected. Layer-by-layer matching at the cost of one
    forward pass over the calibration batches, batch by batch (a forward of the concatenated
    batches would be slower on a CPU: its large tensors thrash the caches and the allocator)."""
    matches: dict[str, LayerMatch] = {}
    lockstep = _Lockstep(len(batches))

    def correct_output(name: str):
        def correct(module: nn.Module, outputs: list[Tensor]) -> tuple[Tensor, Tensor]:
            if name in matches:
                raise _ran_twice_error(name)
            before = plan.statistics(name, module, outputs)
            alpha, beta = plan.correct(name, module, before)
            after = _affine_stats(before, alpha, beta)  # exact, and no second statistics pass
            matches[name] = plan.report(name, before, after, alpha, beta)
            return alpha, beta

        def hook(module: nn.Module, args, output):
            output = _single_tensor(name, module, output)
            alpha, beta = lockstep.rendezvous(name, output, lambda o: correct(module, o))
            return _apply_affine_(output, alpha, beta)

        return hook

    def adapt_batchnorm(name: str):
        def adapt(module: nn.Module, inputs: list[Tensor]) -> None:
            if name in matches:
                raise _ran_twice_error(name)
            input_stats = plan.statistics(name, module, inputs)
            before = _batchnorm_output_stats(module, input_stats)
            alpha, beta = _adapt_batchnorm(module, input_stats)
            after = _batchnorm_output_stats(module, input_stats)
            matches[name] = plan.report(name, before, after, alpha, beta)

        # A pre-hook, so that this very forward normalises with the new running statistics.
        def hook(module: nn.Module, args) -> None:
            lockstep.rendezvous(name, args[0], lambda inputs: adapt(module, inputs))

        return hook

    handles = []
    for name, module in modules.items():
        if plan.adapts_batchnorm(module):
            handles.append(module.register_forward_pre_hook(adapt_batchnorm(name)))
        else:
            handles.append(module.register_forward_hook(correct_output(name)))
    try:
        lockstep.run(net, batches)
    finally:
        for handle in handles:
            handle.remove()
    _check_all_ran(modules, matches)
    return matches


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    """A thread pool kept across calls: a new thread pays to start its own intra-op thread team
    on its first operation, which would cost more than the matching itself on a CPU."""
    global _EXECUTOR
    if _EXECUTOR is None or _EXECUTOR._max_workers < workers:
        if _EXECUTOR is not None:
            _EXECUTOR.shutdown(wait=False)
        _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gaussian-match")
    return _EXECUTOR


class _Aborted(Exception):
    """Raised in the waiting threads of a lockstep run once another thread has failed."""


class _Lockstep:
    """Run ``net(batch)`` for every batch, each in its own thread, the threads taking turns in
    slot order (only one computes at a time: no oversubscription, small tensors). A hook that
    calls ``rendezvous`` pauses its batch until every batch has reached the same layer; the last
    to arrive runs ``on_all`` over everything gathered, and each batch then continues with its
    result. This is how a forward pass can be paused at a layer without knowing the network's
    code. The first error in any thread stops all of them and is raised by ``run``.

    A turn is handed over by releasing the next thread's own semaphore, so each hand-over wakes
    exactly one thread.
    """

    def __init__(self, count: int):
        self.count = count
        self.go = [threading.Semaphore(1 if slot == 0 else 0) for slot in range(count)]
        self.finished: set[int] = set()
        self.errors: list[BaseException] = []
        self.local = threading.local()
        self.gathered: list[Tensor] = []
        self.gathered_at: str | None = None
        self.result = None
        self.threads = torch.get_num_threads()  # the caller's, for the pooled threads

    def run(self, net: nn.Module, batches: list[Tensor]) -> None:
        futures = [
            _executor(len(batches)).submit(self._forward, net, x, slot)
            for slot, x in enumerate(batches)
        ]
        for future in futures:
            future.result()
        real = [error for error in self.errors if not isinstance(error, _Aborted)]
        if real:
            raise real[0]

    def _forward(self, net: nn.Module, x: Tensor, slot: int) -> None:
        self.local.slot = slot
        if torch.get_num_threads() != self.threads:
            # A pooled thread keeps the intra-op thread count it started with (OpenMP's is per
            # thread); use the caller's, or a pool made under set_num_threads(1) stays serial.
            torch.set_num_threads(self.threads)
        try:
            self._wait_for_turn(slot)
            with torch.no_grad():  # grad mode is per thread
                net(x)
            self.finished.add(slot)  # only the thread whose turn it is touches the shared state
            self._pass_turn(slot)
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread by run
            self.errors.append(error)
            for go in self.go:  # wake every waiting thread: each sees the error and stops
                go.release()

    def rendezvous(self, name: str, value: Tensor, on_all):
        """Gather ``value`` from this batch at layer ``name``; return ``on_all(gathered)``."""
        if self.gathered and self.gathered_at != name:
            raise ValueError(
                f"calibration batches reached different layers ({self.gathered_at!r} and "
                f"{name!r}) at the same point: the network must run the same matched layers, "
                "in the same order, for every input"
            )
        self.gathered_at = name
        self.gathered.append(value)
        if len(self.gathered) + len(self.finished) == self.count:  # the last batch to arrive
            gathered, self.gathered = self.gathered, []
            if self.finished:
                raise ValueError(
                    f"layer {name!r} ran for {len(gathered)} of {self.count} calibration "
                    "batches: the network must run every matched layer for every input"
                )
            self.result = on_all(gathered)
        slot = self.local.slot
        self._pass_turn(slot)
        self._wait_for_turn(slot)
        return self.result

    def _wait_for_turn(self, slot: int) -> None:
        self.go[slot].acquire()
        if self.errors:
            raise _Aborted

    def _pass_turn(self, slot: int) -> None:
        """Hand the turn to the next slot whose forward is still running (if any)."""
        for step in range(1, self.count + 1):
            following = (slot + step) % self.count
            if following not in self.finished:
                self.go[following].release()
                return


def _match_layerwise(net, modules, batches, plan: _MatchingPlan) -> dict[str, LayerMatch]:
    """For each layer in execution order, stream every batch through F_t up to that layer,
    then correct it. Holds one batch's activations at a time; costs up to one forward pass over
    the calibration set per layer."""
    matches: dict[str, LayerMatch] = {}
    for name in _execution_order(net, modules, batches[0]):
        module = modules[name]
        adabn = plan.adapts_batchnorm(module)
        outputs, inputs = _stream_to_layer(net, name, module, batches, with_input=adabn)
        before = outputs.compute(plan.reduce)
        if adabn:
            alpha, beta = _adapt_batchnorm(module, inputs.compute(plan.reduce))
        else:
            alpha, beta = plan.correct(name, module, before)
        matches[name] = plan.report(name, before, _affine_stats(before, alpha, beta), alpha, beta)
    return matches


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layer being matched has run."""


def _stream_to_layer(net, name, module, batches, with_input: bool):
    """Run each batch through ``net`` until ``module`` has run; return accumulators of its
    outputs and (if ``with_input``) its inputs."""
    outputs = ChannelStatsAccumulator()
    inputs = ChannelStatsAccumulator()
    reached = 0

    def take_input(mod: nn.Module, args) -> None:
        inputs.update(_channel_checked(name, mod, args[0]))

    def take_output_and_stop(mod: nn.Module, args, output) -> None:
        nonlocal reached
        reached += 1
        outputs.update(_channel_checked(name, mod, _single_tensor(name, mod, output)))
        raise _StopForward

    handles = [module.register_forward_hook(take_output_and_stop)]
    if with_input:
        handles.append(module.register_forward_pre_hook(take_input))
    try:
        for x in batches:
            try:
                net(x)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if reached != len(batches):
        raise ValueError(
            f"layer {name!r} ran for {reached} of {len(batches)} calibration batches: the "
            "network must run every matched layer for every input"
        )
    return outputs, inputs


def _execution_order(net, modules, example: Tensor) -> list[str]:
    """The order in which the matched layers run, from one forward of ``example``."""
    order: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, args, output) -> None:
            if name in order:
                raise _ran_twice_error(name)
            order.append(name)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    try:
        net(example)
    finally:
        for handle in handles:
            handle.remove()
    _check_all_ran(modules, order)
    return order


def _ran_twice_error(name: str) -> ValueError:
    return ValueError(
        f"layer {name!r} ran twice in one forward pass (shared weights?): one correction "
        "cannot be folded into weights used in two places; match layers that run once"
    )


def _check_all_ran(modules: dict[str, nn.Module], ran: Iterable[str]) -> None:
    ran = set(ran)
    missing = [name for name in modules if name not in ran]
    if missing:
        raise ValueError(
            f"layers {missing} were not called during the forward pass (or no batch was "
            "given); match only layers the forward pass runs"
        )


def _single_tensor(name: str, module: nn.Module, output) -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(
            f"layer {name!r} ({type(module).__name__}) returned {type(output).__name__}; "
            "a matched layer must return one tensor"
        )
    return output


def _output_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, BATCHNORM_LAYERS):
        return module.num_features
    return module.out_channels


def _channel_checked(name: str, module: nn.Module, activation: Tensor) -> Tensor:
    """``activation``, after checking that dim 1 holds the layer's channels (a Linear applied
    to (N, L, features) has its channels last, which per-channel matching cannot handle)."""
    expected = _output_channels(module)
    if activation.dim() < 2 or activation.shape[1] != expected:
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has {expected} channels but its "
            f"activation has shape {tuple(activation.shape)}; Gaussian matching needs the "
            "channels in dim 1, as in (N, C) or (N, C, ...)"
        )
    return activation


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


def _batchnorm_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm: y = scale * x + shift per channel, float64."""
    inv_std = (module.running_var.double() + module.eps).rsqrt()
    if not module.affine:
        return inv_std, -inv_std * module.running_mean.double()
    scale = module.weight.double() * inv_std
    return scale, module.bias.double() - scale * module.running_mean.double()


def _batchnorm_output_stats(module: nn.Module, inputs: ChannelStats) -> ChannelStats:
    """Statistics of an eval-mode BatchNorm's output, given those of its input."""
    return _affine_stats(inputs, *_batchnorm_affine(module))


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


def _apply_affine_(output: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """alpha * output + beta per channel (dim 1), in place, in the output's dtype."""
    shape = (1, -1) + (1,) * (output.dim() - 2)
    return output.mul_(alpha.to(output).view(shape)).add_(beta.to(output).view(shape))


def _affine_stats(stats: ChannelStats, alpha: Tensor, beta: Tensor) -> ChannelStats:
    """Statistics of alpha * A + beta, given those of A."""
    return ChannelStats(alpha * stats.mean + beta, alpha.abs() * stats.std, stats.count)


def _check_matchable(name: str, module: nn.Module, batchnorm: str) -> None:
    """Refuse, with the fix, a layer whose correction cannot be folded into its parameters."""
    kind = type(module).__name__
    if not isinstance(module, MATCHABLE_LAYERS):
        raise ValueError(
            f"layer {name!r} is a {kind}, which has no weights to fold a correction into; "
            "Gaussian matching corrects Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d and "
            "BatchNorm (1d/2d/3d, SyncBatchNorm) layers. To match an activation after a ReLU (or "
            "another parameter-free layer), name the Conv/Linear before it"
        )
    if isinstance(module, BATCHNORM_LAYERS):
        if batchnorm == "fold" and not module.affine:
            raise ValueError(
                f"BatchNorm layer {name!r} has affine=False, so there is no gamma/beta to fold "
                "the correction into; pass batchnorm='adabn', or build it with affine=True"
            )
        if batchnorm == "adabn" and module.running_mean is None:
            raise ValueError(
                f"BatchNorm layer {name!r} tracks no running statistics "
                "(track_running_stats=False), so AdaBN has nothing to adapt; pass "
                "batchnorm='fold' or leave it out of `layers`"
            )
        return
    if module.bias is None:
        raise ValueError(
            f"layer {name!r} ({kind}) has no bias to take the mean correction; build it "
            "with bias=True, or match the BatchNorm that follows it instead"
        )
    if _is_grouped_transposed(module):
        raise ValueError(
            f"layer {name!r} ({kind}) has groups={module.groups}; only transposed "
            "convolutions with groups=1 can be folded: leave it out of `layers`"
        )


@contextmanager
def eval_mode(*nets: nn.Module):
    """Eval mode for the duration; every submodule's own training flag is restored after (a
    plain ``net.train()`` would also wake layers kept in eval mode on purpose, such as F_t's
    frozen BatchNorms).

    Example:
        >>> net = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1).eval())
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = {m: m.training for net in nets for m in net.modules()}
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


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
        raise
