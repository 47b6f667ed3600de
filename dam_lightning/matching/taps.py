"""Capture the activations of named layers of a network with forward hooks.

A *tap* is a submodule named by its dotted path (``"fc3"``, ``"encoder.layers.4"``); its output is
the activation that GAM matches. This file only observes a network: it never changes an output.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from dam_lightning.errors import ConfigError, SetupError
from dam_lightning.matching.hooks import TAPPED, forward_hooks

OUTPUT = "output"
"""The tap name of the network's own output (its logits), whatever its last layer is called, so
one config (e.g. the ADDA ablation, ``layers: {output: 1.0}``) fits LeNet and ERFNet alike."""


def resolve_layer(net: nn.Module, name: str) -> nn.Module:
    """Return the submodule of ``net`` at dotted path ``name`` (``"output"``: ``net`` itself,
    unless a submodule has that name), or raise a ValueError listing the valid names (so a typo
    in a config is fixed from the message alone).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> resolve_layer(net, "0"), resolve_layer(net, "output") is net
        (Linear(in_features=2, out_features=2, bias=True), True)
    """
    modules = dict(net.named_modules())
    if name == OUTPUT and name not in modules:
        return net
    if name == "" or name not in modules:
        valid = ", ".join([n for n in modules if n] + [f"{OUTPUT} (the network's output)"])
        raise ConfigError(
            f"{type(net).__name__} has no layer named {name!r}. Valid layer names: {valid}"
        )
    return modules[name]


class ActivationTaps:
    """Record the outputs of the named layers of ``net`` during each forward pass.

    Use it as a callable: ``taps(x)`` runs ``net(x)`` and returns ``{layer name: activation}``
    in the order the names were given. The activations keep their autograd graph, so the same
    call serves the discriminator step (detach them) and the target-network step.

    Layers are looked up by name at every call, so a tap follows a layer that was replaced after
    the taps were built: ``Trainer(sync_batchnorm=True)`` swaps every BatchNorm for a
    SyncBatchNorm when DDP starts, after the module (and its taps) were constructed.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> taps = ActivationTaps(net, ["1", "2"])
        >>> {k: tuple(v.shape) for k, v in taps(torch.zeros(5, 4)).items()}
        {'1': (5, 3), '2': (5, 2)}
    """

    def __init__(self, net: nn.Module, layers: Iterable[str]):
        self.net = net
        self.layers = list(layers)
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layer names must be unique, got {self.layers}")
        refuse_compiled(net)
        for name in self.layers:  # a wrong name fails here, with the valid names
            resolve_layer(net, name)
        self._captured: dict[str, Tensor] = {}

    def _hook(self, name: str):
        def capture(module: nn.Module, args, output) -> None:
            self._captured[name] = TAPPED.one_tensor(name, module, output)

        return capture

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """Run the network on ``x`` and return the tapped activations."""
        self._captured = {}
        if _compiled(self.net):  # compiled after the taps were built
            refuse_compiled(self.net)
        modules = {name: _layer(self.net, name) for name in self.layers}  # the ones that run now
        with forward_hooks(modules, self._hook):
            self.net(x)
        missing = [n for n in self.layers if n not in self._captured]
        if missing:
            raise SetupError(
                f"matched layers {missing} of {type(self.net).__name__} produced no activation in "
                "this forward pass: the network does not call them (a layer of a branch this "
                "input skips, or a module kept aside); match layers that every forward runs"
            )
        captured, self._captured = self._captured, {}
        return {name: captured[name] for name in self.layers}


def _layer(net: nn.Module, name: str) -> nn.Module:
    """``resolve_layer`` for a name already checked, without listing every module."""
    try:
        return net.get_submodule(name)
    except AttributeError:  # "output" on a network without a submodule of that name
        return net


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile(m)``'s wrapper or was compiled in place
    (``m.compile()``)."""
    wrapper = type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")
    return wrapper or getattr(module, "_compiled_call_impl", None) is not None


def refuse_compiled(net: nn.Module) -> None:
    """Refuse a network of which any part went through ``torch.compile``: taps are forward hooks
    on named layers, and a compiled graph neither keeps the layers' names (``_orig_mod.``) nor
    runs a hook added after it was traced; GAM would match the wrong activations or none.

    Example:
        >>> import torch
        >>> refuse_compiled(torch.nn.Linear(2, 2))  # a plain network passes
        >>> refuse_compiled(torch.compile(torch.nn.Linear(2, 2)))
        Traceback (most recent call last):
        ...
        dam_lightning.errors.ConfigError: torch.compile is not supported for a network GAM taps: ...
    """
    found = next((name or "the network" for name, m in net.named_modules() if _compiled(m)), None)
    if found is not None:
        raise ConfigError(
            f"torch.compile is not supported for a network GAM taps: {found} is compiled, and "
            "the activation taps are forward hooks on named layers, which a compiled graph does "
            "not keep. Pass the network uncompiled (GPU speed comes from precision: bf16-mixed, "
            "benchmark: true and the networks' channels_last option)"
        )
