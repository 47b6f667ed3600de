"""Forward-hook helpers shared by everything that watches named layers run: the taps
(``taps.py``), the statistics (``statistics.py``), the matching engines (``engine.py``) and the
diagnosis (``dam_lightning.diagnosis.activations``).

One home, so that hooks are always removed (also on an error), a layer that returns something
other than one tensor or runs twice is refused the same way everywhere, and a network's
submodules keep their own training flags after an evaluation. Each user names its ``HookRole``:
the refusals say what the layer was hooked for (matched, diagnosed, tapped) and what to do.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from dam_lightning.errors import ConfigError, WrongTypeError


@dataclass(frozen=True)
class HookRole:
    """What a hooked layer is for, as its refusals word it.

    Attributes:
        word: the layer's role in "a <word> layer must return one tensor".
        once: why the layer must run only once per forward pass, and what to do instead.
        channels_in_dim_1: also refuse a tensor without a channel dim (fewer than 2 dims).
    """

    word: str
    once: str = ""
    channels_in_dim_1: bool = False

    def one_tensor(self, name: str, module: nn.Module, output) -> Tensor:
        """``output``, after checking that it is one tensor (with a dim 1, where asked).

        Example:
            >>> MATCHED.one_tensor("fc", nn.Identity(), (1, 2))  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            dam_lightning.errors.WrongTypeError: layer 'fc' (Identity) returned tuple; ...
        """
        if self.channels_in_dim_1:
            if not isinstance(output, Tensor) or output.dim() < 2:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise WrongTypeError(
                    f"layer {name!r} ({type(module).__name__}) returned {shape}; a {self.word} "
                    "layer must return one tensor with its channels in dim 1, (N, C) or (N, C, ...)"
                )
        elif not isinstance(output, Tensor):
            raise WrongTypeError(
                f"layer {name!r} ({type(module).__name__}) returned {type(output).__name__}; "
                f"a {self.word} layer must return one tensor"
            )
        return output

    def ran_twice(self, name: str) -> ValueError:
        """The error for layer ``name`` running a second time in one forward pass."""
        return ValueError(
            f"layer {name!r} ran twice in one forward pass (shared weights?): {self.once}"
        )


MATCHED = HookRole(
    "matched",
    once="one correction cannot be folded into weights used in two places; match layers that "
    "run once",
)
DIAGNOSED = HookRole(
    "diagnosed",
    once="its statistics would mix two activations; diagnose layers that run once",
    channels_in_dim_1=True,
)
TAPPED = HookRole("tapped")


@contextmanager
def forward_hooks(
    modules: Mapping[str, nn.Module], make_hook: Callable[[str], Callable], pre: bool = False
):
    """For the duration, ``make_hook(name)`` is a forward hook (``pre``: a forward pre-hook) of
    each named module; every hook is removed afterwards, also when the block fails.

    Example:
        >>> import torch
        >>> net, seen = nn.Sequential(nn.Linear(2, 3)), []
        >>> hook = lambda name: lambda module, args, output: seen.append((name, output.shape[1]))
        >>> with forward_hooks({"0": net[0]}, hook):
        ...     _ = net(torch.zeros(1, 2))
        >>> _ = net(torch.zeros(1, 2))  # removed: not recorded
        >>> seen
        [('0', 3)]
    """
    handles = []
    try:
        for name, module in modules.items():
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def execution_order(
    net: nn.Module, modules: Mapping[str, nn.Module], example: Tensor, role: HookRole
) -> tuple[list[str], str]:
    """Run ``net(example)`` once and return the order in which the named ``modules`` ran, and the
    name of the last one whose output is the network's own output (``""`` when none is). A
    layer that returns something other than one tensor or runs twice is refused (``role``'s
    errors) during the pass; one that does not run is the caller's to refuse. The caller picks
    the grad and train/eval mode. No activation is kept beyond the pass's own.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> execution_order(net, {"1": net[1], "0": net[0]}, torch.zeros(1, 2), MATCHED)
        (['0', '1'], '1')
    """
    order: list[str] = []
    outputs: dict[str, weakref.ref] = {}  # weak: an output the network drops is not held

    def record(name: str):
        def hook(module: nn.Module, args, output) -> None:
            output = role.one_tensor(name, module, output)
            if name in outputs:
                raise role.ran_twice(name)
            order.append(name)
            outputs[name] = weakref.ref(output)

        return hook

    with forward_hooks(modules, record):
        output = net(example)
    if output is None:  # the reference to a dropped output gives None too
        return order, ""
    return order, next((name for name in reversed(order) if outputs[name]() is output), "")


def check_all_ran(modules: Iterable[str], ran: Iterable[str]) -> None:
    """Refuse matched layers that a forward pass did not run (their names not in ``ran``)."""
    ran = set(ran)
    missing = [name for name in modules if name not in ran]
    if missing:
        raise ConfigError(
            f"layers {missing} were not called during the forward pass (or no batch was "
            "given); match only layers the forward pass runs"
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
