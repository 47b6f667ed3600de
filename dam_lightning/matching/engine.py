"""The execution engines of Gaussian matching: how forwards of F_t over the calibration batches
are scheduled so that every matched layer is corrected from the statistics of its output on all
of them, with every earlier matched layer already corrected (the paper matches layer by layer,
in network order).

- ``one_pass``: each batch runs through F_t once, all batches in lockstep (``_Lockstep``): about
  one forward pass over the calibration batches; holds every batch's activation at one layer.
- ``layerwise``: the batches are streamed once per matched layer, each forward stopped right
  after it: one batch's activations at a time, up to one forward pass per layer.

Both give the same weights. Apart from ``gaussian.py`` because scheduling is a problem of its own
(threads, hooks that pause a forward, stopping a forward early) and knows nothing of Eq. 2: a
``gaussian.MatchingPlan`` turns each layer's statistics into its correction and ``LayerMatch``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dam_lightning.errors import ConfigError
from dam_lightning.matching.hooks import MATCHED, check_all_ran, execution_order, forward_hooks
from dam_lightning.matching.statistics import ChannelStats, ChannelStatsAccumulator

LayerMatch = Any
"""What the plan returns for one matched layer (``gaussian.LayerMatch``); engines only collect it."""


class MatchingPlan(Protocol):
    """What an engine asks of Gaussian matching; ``gaussian.MatchingPlan`` is the one
    implementation (declared here so that this file does not import gaussian.py, which imports
    it)."""

    reduce: Callable[[Tensor], Tensor]

    def adapts_batchnorm(self, module: nn.Module) -> bool: ...

    def statistics(
        self, name: str, module: nn.Module, activations: list[Tensor]
    ) -> ChannelStats: ...

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
                raise MATCHED.ran_twice(name)
            match = plan.correct(name, module, plan.statistics(name, module, outputs))
            matches[name] = match
            return match.alpha, match.beta

        def hook(module: nn.Module, args, output):
            output = MATCHED.one_tensor(name, module, output)
            alpha, beta = lockstep.rendezvous(name, output, lambda o: correct(module, o))
            return _apply_affine_(output, alpha, beta)

        return hook

    def adapt_batchnorm(name: str):
        def adapt(module: nn.Module, inputs: list[Tensor]) -> None:
            if name in matches:
                raise MATCHED.ran_twice(name)
            matches[name] = plan.adapt(name, module, plan.statistics(name, module, inputs))

        # A pre-hook, so that this very forward normalises with the new running statistics.
        def hook(module: nn.Module, args) -> None:
            lockstep.rendezvous(name, args[0], lambda inputs: adapt(module, inputs))

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
            raise ConfigError(
                f"calibration batches reached different layers ({self.gathered_at!r} and "
                f"{name!r}) at the same point: the network must run the same matched layers, "
                "in the same order, for every input"
            )
        self.gathered_at = name
        self.gathered.append(value)
        if len(self.gathered) + len(self.finished) == self.count:  # the last batch to arrive
            gathered, self.gathered = self.gathered, []
            if self.finished:
                raise ConfigError(
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
