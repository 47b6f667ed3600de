"""The execution engines of Gaussian matching: how forwards of F_t over the calibration batches
are scheduled so that every matched layer is corrected from the statistics of its output on all
of them, with every earlier matched layer already corrected (the paper matches layer by layer,
in network order).

- ``one_pass``: each batch runs through F_t once, all batches in lockstep (``_Lockstep``): about
  one forward pass over the calibration batches; the paused forwards hold every batch's
  activation at the current layer (memory grows with the number of batches).
- ``layerwise``: the batches are streamed once per matched layer, each forward stopped right
  after it: one batch's activations at a time (memory flat in the number of batches), up to one
  forward pass per layer.

Both give the same weights, and both compute every statistic under the caller's autocast state,
CUDA device and stream, and reduce across processes from the calling thread only. Apart from
``gaussian.py`` because scheduling is a problem of its own (threads, hooks that pause a forward,
stopping a forward early) and knows nothing of Eq. 2: a ``gaussian.MatchingPlan`` turns each
layer's statistics into its correction and ``LayerMatch``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dam_lightning.errors import ConfigError
from dam_lightning.matching.hooks import MATCHED, check_all_ran, execution_order, forward_hooks
from dam_lightning.matching.statistics import ChannelStats, ChannelStatsAccumulator

LayerMatch = Any
"""What the plan returns for one matched layer (``gaussian.LayerMatch``); engines only collect
it."""


_LAYER_MATCHED: ContextVar[Callable[[str], None] | None] = ContextVar(
    "layer_matched", default=None
)


@contextmanager
def reporting_matched_layers(layer_matched: Callable[[str], None]) -> Iterator[None]:
    """Within the block, both engines call ``layer_matched(name)`` in the calling thread once
    each layer is corrected (a progress bar: matching ERFNet's 113 layers takes a while). A
    context variable, so that ``gaussian_match`` and its callers need no argument for it.

    Example:
        >>> done = []
        >>> with reporting_matched_layers(done.append):
        ...     _report_matched("encoder.0")
        >>> done
        ['encoder.0']
    """
    token = _LAYER_MATCHED.set(layer_matched)
    try:
        yield
    finally:
        _LAYER_MATCHED.reset(token)


def _report_matched(name: str) -> None:
    layer_matched = _LAYER_MATCHED.get()
    if layer_matched is not None:
        layer_matched(name)


class MatchingPlan(Protocol):
    """What an engine asks of Gaussian matching; ``gaussian.MatchingPlan`` is the one
    implementation (declared here so that this file does not import gaussian.py, which imports
    it)."""

    reduce: Callable[[Tensor], Tensor]

    def adapts_batchnorm(self, module: nn.Module) -> bool: ...

    def channel_checked(self, name: str, module: nn.Module, activation: Tensor) -> Tensor: ...

    def correct(self, name: str, module: nn.Module, before: ChannelStats) -> LayerMatch: ...

    def adapt(
        self,
        name: str,
        module: nn.Module,
        inputs: ChannelStats,
        measured: ChannelStats | None = None,
    ) -> LayerMatch: ...


def one_pass(
    net: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Tensor], plan: MatchingPlan
) -> dict[str, LayerMatch]:
    """Each calibration batch runs through F_t once, all batches in lockstep (``_Lockstep``): a
    matched layer's hook adds its batch's output to the layer's statistics and pauses; once
    every batch has reached the layer, the calling thread corrects the layer from the statistics
    and hands each batch its corrected output, so every later layer is measured with earlier
    ones already corrected. Layer-by-layer matching at the cost of one forward pass over the
    calibration batches, batch by batch (a forward of the concatenated batches would be slower
    on a CPU: its large tensors thrash the caches and the allocator).

    Memory: the N paused forwards each hold their own activations at the current layer (what a
    forward of the concatenated batches would hold); the engine itself keeps only the layer's
    (3, C) running sums. Exact lockstep cannot do with less: layer i + 1 is measured on every
    batch's corrected output of layer i, which is known only once all N outputs of layer i have
    been measured. ``layerwise`` is the engine whose memory is flat in N."""
    matches: dict[str, LayerMatch] = {}

    def match(name: str, statistics: ChannelStatsAccumulator) -> tuple[Tensor, Tensor] | None:
        # In the calling thread: the reduction across processes is a collective.
        if name in matches:
            raise MATCHED.ran_twice(name)
        module = modules[name]
        measured = statistics.compute(plan.reduce)
        if plan.adapts_batchnorm(module):
            matches[name] = plan.adapt(name, module, measured)
            _report_matched(name)
            return None
        matches[name] = plan.correct(name, module, measured)
        _report_matched(name)
        return matches[name].alpha, matches[name].beta

    lockstep = _Lockstep(len(batches), match)

    def correct_output(name: str):
        def hook(module: nn.Module, args, output):
            output = plan.channel_checked(name, module, MATCHED.one_tensor(name, module, output))
            alpha, beta = lockstep.rendezvous(name, output)
            return _apply_affine_(output, alpha, beta)

        return hook

    def adapt_batchnorm(name: str):
        # A pre-hook, so that this very forward normalises with the new running statistics.
        def hook(module: nn.Module, args) -> None:
            lockstep.rendezvous(name, plan.channel_checked(name, module, args[0]))

        return hook

    adabn = {name: m for name, m in modules.items() if plan.adapts_batchnorm(m)}
    folded = {name: m for name, m in modules.items() if name not in adabn}
    with forward_hooks(adabn, adapt_batchnorm, pre=True), forward_hooks(folded, correct_output):
        lockstep.run(net, batches)
    check_all_ran(modules, matches)
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


# Autocast is thread-local per device type; these are the types torch.autocast accepts by name.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


@dataclass(frozen=True)
class _CallerContext:
    """The thread-local state that the caller's own forward would run under and that a pool
    thread does not inherit: autocast (per device type: enabled, dtype, cache), the current CUDA
    device and stream, and the intra-op thread count."""

    autocast: tuple[tuple[str, torch.dtype], ...]
    autocast_cache: bool
    cuda_device: int | None
    cuda_stream: Any
    threads: int

    @classmethod
    def capture(cls) -> _CallerContext:
        autocast = tuple(
            (device_type, torch.get_autocast_dtype(device_type))
            for device_type in _AUTOCAST_DEVICE_TYPES
            if torch.is_autocast_enabled(device_type)
        )
        # Only once CUDA is in use: asking for the current stream would initialise it.
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(
            autocast=autocast,
            autocast_cache=torch.is_autocast_cache_enabled(),
            cuda_device=torch.cuda.current_device() if cuda else None,
            cuda_stream=torch.cuda.current_stream() if cuda else None,
            threads=torch.get_num_threads(),
        )

    @contextmanager
    def entered(self) -> Iterator[None]:
        if torch.get_num_threads() != self.threads:
            # A pooled thread keeps the intra-op thread count it started with (OpenMP's is per
            # thread); use the caller's, or a pool made under set_num_threads(1) stays serial.
            torch.set_num_threads(self.threads)
        with ExitStack() as stack:
            if self.cuda_device is not None:
                stack.enter_context(torch.cuda.device(self.cuda_device))
                stack.enter_context(torch.cuda.stream(self.cuda_stream))
            for device_type, dtype in self.autocast:
                stack.enter_context(
                    torch.autocast(device_type, dtype=dtype, cache_enabled=self.autocast_cache)
                )
            yield


class _Aborted(Exception):
    """Raised in a paused thread of a lockstep run that is being stopped."""


class _Lockstep:
    """Run ``net(batch)`` for every batch, each in a thread of a persistent pool, paused in
    lockstep at the matched layers and conducted by the calling thread. This is how a forward
    pass can be paused at a layer without knowing the network's code (one thread cannot: a hook
    that ran the other batches itself could resume them only last-in, first-out).

    The calling thread resumes one pool thread at a time (only one computes: no
    oversubscription, and the shared statistics need no lock). A thread runs, under the
    caller's context (``_CallerContext``), until a hook calls ``rendezvous``, which adds its
    activation to the layer's statistics and pauses it. Once every batch has paused at the same
    layer, the calling thread runs ``match(layer, statistics)`` (reduction across processes,
    correction) and resumes each thread with its result: collectives are issued only by the
    calling thread. The first error stops every thread and is raised by ``run``.
    """

    def __init__(self, count: int, match: Callable[[str, ChannelStatsAccumulator], Any]):
        self.count = count
        self.match = match
        self.resume = [threading.Semaphore(0) for _ in range(count)]
        self.paused = threading.Semaphore(0)  # released by a thread that paused or ended
        self.at: list[str | None] = [None] * count  # the layer each thread last paused at
        self.ended: set[int] = set()
        self.errors: list[BaseException | None] = [None] * count
        self.statistics = ChannelStatsAccumulator()
        self.result: Any = None
        self.aborted = False
        self.local = threading.local()

    def run(self, net: nn.Module, batches: Sequence[Tensor]) -> None:
        context = _CallerContext.capture()
        pool = _executor(self.count)
        futures = [
            pool.submit(self._forward, net, x, slot, context) for slot, x in enumerate(batches)
        ]
        try:
            live = list(range(self.count))
            while live:
                for slot in live:
                    self._step(slot)
                    if self.errors[slot] is not None:
                        raise self.errors[slot]
                live = [slot for slot in live if slot not in self.ended]
                if live:
                    statistics, self.statistics = self.statistics, ChannelStatsAccumulator()
                    self.result = self.match(self._layer(live), statistics)
        finally:
            self.aborted = True  # every thread still paused unwinds, one at a time
            for slot in range(self.count):
                if slot not in self.ended:
                    self._step(slot)
            for future in futures:
                future.result()

    def _layer(self, paused: list[int]) -> str:
        """The one layer at which the ``paused`` threads wait, checked to be every batch's."""
        names = sorted({self.at[slot] for slot in paused})
        if len(names) > 1:
            raise ConfigError(
                f"calibration batches reached different layers ({names[0]!r} and {names[1]!r}) "
                "at the same point: the network must run the same matched layers, in the same "
                "order, for every input"
            )
        if len(paused) != self.count:
            raise ConfigError(
                f"layer {names[0]!r} ran for {len(paused)} of {self.count} calibration batches: "
                "the network must run every matched layer for every input"
            )
        return names[0]

    def _step(self, slot: int) -> None:
        """Let thread ``slot`` run until it pauses or ends."""
        self.resume[slot].release()
        self.paused.acquire()

    def _forward(self, net: nn.Module, x: Tensor, slot: int, context: _CallerContext) -> None:
        self.local.slot = slot
        try:
            self._wait(slot)
            with context.entered(), torch.no_grad():  # grad mode is per thread too
                net(x)
        except _Aborted:
            pass
        except BaseException as error:  # noqa: BLE001 - raised in the calling thread by run
            self.errors[slot] = error
        finally:
            self.ended.add(slot)
            self.paused.release()

    def rendezvous(self, name: str, activation: Tensor) -> Any:
        """Add this batch's ``activation`` at layer ``name`` to the statistics, pause until every
        batch has, and return what ``match`` made of them."""
        slot = self.local.slot
        self.statistics.update(activation)
        self.at[slot] = name
        self.paused.release()
        self._wait(slot)
        return self.result

    def _wait(self, slot: int) -> None:
        self.resume[slot].acquire()
        if self.aborted:
            raise _Aborted


def layerwise(
    net: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Tensor], plan: MatchingPlan
) -> dict[str, LayerMatch]:
    """For each layer in execution order, stream every batch through F_t up to that layer,
    then correct it. Holds one batch's activations at a time; costs up to one forward pass over
    the calibration set per layer."""
    order, _ = execution_order(net, modules, batches[0], MATCHED)
    check_all_ran(modules, order)
    matches: dict[str, LayerMatch] = {}
    for name in order:
        module = modules[name]
        adabn = plan.adapts_batchnorm(module)
        outputs, inputs = _stream_to_layer(net, name, module, batches, plan, with_input=adabn)
        before = outputs.compute(plan.reduce)
        if adabn:
            matches[name] = plan.adapt(name, module, inputs.compute(plan.reduce), measured=before)
        else:
            matches[name] = plan.correct(name, module, before)
        _report_matched(name)
    return matches


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layer being matched has run."""


def _stream_to_layer(net, name, module, batches, plan: MatchingPlan, with_input: bool):
    """Run each batch through ``net`` until ``module`` has run; return accumulators of its
    outputs and (if ``with_input``) its inputs."""
    outputs = ChannelStatsAccumulator()
    inputs = ChannelStatsAccumulator()
    reached = 0

    def take_input(mod: nn.Module, args) -> None:
        inputs.update(plan.channel_checked(name, mod, args[0]))

    def take_output_and_stop(mod: nn.Module, args, output) -> None:
        nonlocal reached
        reached += 1
        outputs.update(plan.channel_checked(name, mod, MATCHED.one_tensor(name, mod, output)))
        raise _StopForward

    hooked = {name: module}
    with (
        forward_hooks(hooked, lambda _: take_output_and_stop),
        forward_hooks(hooked if with_input else {}, lambda _: take_input, pre=True),
    ):
        for x in batches:
            try:
                net(x)
            except _StopForward:
                pass
    if reached != len(batches):
        raise ConfigError(
            f"layer {name!r} ran for {reached} of {len(batches)} calibration batches: the "
            "network must run every matched layer for every input"
        )
    return outputs, inputs


def _apply_affine_(output: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """alpha * output + beta per channel (dim 1), in place, in the output's dtype."""
    shape = (1, -1) + (1,) * (output.dim() - 2)
    return output.mul_(alpha.to(output).view(shape)).add_(beta.to(output).view(shape))
