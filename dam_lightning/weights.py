"""Reading weights files: the one place in dam_lightning that opens a checkpoint or a state dict.

Every file a user names (``source_weights``, ``init_weights``, ``--ckpt_path``, a network's
``weights``) is read by ``read_weights_file``, with ``torch.load(weights_only=True)``: tensors,
numbers, strings and the containers of these, nothing else. A file whose pickle holds any other
Python object (a class, a function, an object with ``__reduce__``) is refused before that object
is built, so nothing in the file ever runs; the error says so and how to turn a trusted file into
a plain state dict. The library's own checkpoints (``SourceModule``, ``GAMAdaptModule``, written
by Lightning) hold only such plain values.

Plain torch and the standard library: ``models/`` may use it without importing Lightning.
"""

from __future__ import annotations

import datetime
import glob
import os
import pickle
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dam_lightning.errors import (
    ConfigError,
    DataError,
    MissingFileError,
    NotAFileError,
    UnreadableFileError,
)

NETWORK_PREFIXES = ("net.", "target_net.")
"""Where a network's weights sit in a checkpoint's ``state_dict``: ``net.`` (``SourceModule``),
then ``target_net.`` (``GAMAdaptModule``'s adapted network)."""


class WeightsFileError(DataError):
    """A weights file that exists but holds no weights that can be read."""


class UnsafeWeightsFileError(WeightsFileError):
    """A weights file whose pickle holds Python objects besides weights: refused, not run."""


def read_weights_file(path: str | os.PathLike, setting: str) -> dict:
    """The dict in the checkpoint or state dict file ``path``, on the CPU, read with
    ``torch.load(weights_only=True)``: nothing in the file is executed. Errors are one line that
    names ``setting`` (the option the file came from, e.g. ``"source_weights"``), the file and
    the fix (``dam_lightning.errors``): ``MissingFileError``, a ``FileNotFoundError`` (no such
    file), ``NotAFileError``, an ``IsADirectoryError`` (a folder),
    ``UnsafeWeightsFileError`` (Python objects besides weights), ``WeightsFileError``
    (truncated, corrupt, or not a dict).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save({"state_dict": {"net.w": torch.ones(2)}}, f"{folder}/a.ckpt")
        ...     read_weights_file(f"{folder}/a.ckpt", "init_weights")
        {'state_dict': {'net.w': tensor([1., 1.])}}
        >>> read_weights_file("no/such.ckpt", "source_weights")
        Traceback (most recent call last):
        ...
        dam_lightning.errors.MissingFileError: source_weights: no/such.ckpt does not exist; pass the path of a checkpoint (.ckpt) or state dict (.pt) file
    """  # noqa: E501
    path = os.fspath(path)
    if os.path.isdir(path):
        raise NotAFileError(f"{setting}: {path} is a folder, not a weights file; "
                            f"{_files_in(path)}")  # fmt: skip
    if not os.path.isfile(path):
        problem = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise MissingFileError(
            f"{setting}: {path} {problem}; pass the path of a checkpoint (.ckpt) or state dict "
            "(.pt) file"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(str(err))
        if _holds_python_objects(detail):
            message = python_objects_message(path, detail)
            raise UnsafeWeightsFileError(f"{setting}: {message}") from err
        raise WeightsFileError(f"{setting}: {unreadable_checkpoint(path, err)}") from err
    except PermissionError as err:
        raise UnreadableFileError(
            f"{setting}: {path} cannot be read ({err.strerror}); check its permissions"
        ) from err
    except Exception as err:  # the zip reader and the unpickler raise many kinds
        raise WeightsFileError(f"{setting}: {unreadable_checkpoint(path, err)}") from err
    if not isinstance(blob, dict):
        raise WeightsFileError(
            f"{setting}: {path} holds a {type(blob).__name__}, not a checkpoint or state dict"
        )
    return blob


def python_objects_message(path: str, detail: str = "") -> str:
    """The message for a file that holds Python objects besides weights (``detail``: what the
    weights-only unpickler refused, e.g. ``GLOBAL io.open``)."""
    found = re.search(r"GLOBAL ([\w.]+)", detail)
    what = f" ({found.group(1).rstrip('.')})" if found else ""
    out = os.path.splitext(path)[0] + "_weights.pt"
    return (
        f"{path} holds Python objects besides weights{what}, so it was not loaded and nothing "
        "in it was executed: dam_lightning reads only tensors, numbers and strings "
        "(torch.load with weights_only=True). If you trust the file, save its weights as a "
        f"plain state dict and pass that: python -c \"import torch; torch.save(torch.load("
        f"{path!r}, weights_only=False)['state_dict'], {out!r})\" (for a whole saved model, "
        "write .state_dict() instead of ['state_dict'])"
    )


def unreadable_checkpoint(path: str, err: BaseException) -> str:
    """The message for a checkpoint file that cannot be read: truncated or corrupt."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    pickled = isinstance(err, pickle.UnpicklingError)  # a pickle, but not torch.save's
    detail = _unpickler_detail(str(err)) if pickled else str(err)
    detail = (detail.splitlines() or [""])[0].split(". ")[0] or "unexpected end of file"
    detail = detail if len(detail) <= 90 else detail[:87] + "..."
    what = "truncated or corrupt" + (", or not written by torch.save" if pickled else "")
    return (
        f"{path} ({size:,} bytes) is not a readable checkpoint: it is {what} "
        f"({type(err).__name__}: {detail}). Use another checkpoint, or train it again"
    )


def network_state_dict(
    blob: Mapping, prefixes: Sequence[str] = NETWORK_PREFIXES, path: str = "", setting: str = ""
) -> dict[str, torch.Tensor]:
    """One network's state dict out of what ``read_weights_file`` returned: a Lightning
    checkpoint's ``state_dict`` (else ``blob`` itself, a plain state dict), restricted to the
    first of ``prefixes`` that any key starts with, which is removed; with none, all of it.

    Example:
        >>> network_state_dict({"state_dict": {"net.w": 1, "disc.w": 2}})
        {'w': 1}
        >>> network_state_dict({"w": 1}, prefixes=("source_net.",))
        {'w': 1}
    """
    state = blob.get("state_dict", blob)
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"{setting}: {path} holds no state dict")
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with ``prefix`` removed, if every key has it; else unchanged.

    Example:
        >>> strip_prefix({"model.a": 1, "model.b": 2}, "model.")
        {'a': 1, 'b': 2}
        >>> strip_prefix({"model.a": 1, "b": 2}, "model.")
        {'model.a': 1, 'b': 2}
    """
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def read_state_dict(
    path: str | os.PathLike, setting: str, prefixes: Sequence[str] = NETWORK_PREFIXES
) -> dict[str, torch.Tensor]:
    """``network_state_dict(read_weights_file(path, setting), prefixes)``: the state dict in a
    local file, a plain one or a Lightning checkpoint's network.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save({"state_dict": {"net.w": torch.ones(1)}}, f"{folder}/a.ckpt")
        ...     list(read_state_dict(f"{folder}/a.ckpt", "weights"))
        ['w']
    """
    path = os.fspath(path)
    return network_state_dict(read_weights_file(path, setting), prefixes, path, setting)


def load_network_weights(
    net: nn.Module,
    path: str,
    prefixes: Sequence[str] = NETWORK_PREFIXES,
    setting: str = "source_weights",
) -> str:
    """Load ``net``'s weights from a ``SourceModule`` checkpoint or a plain state dict; returns
    where the file came from (its run folder, if recorded, and when it was written).

    A Lightning checkpoint's ``state_dict`` is searched for the ``prefixes`` in order: by
    default ``net.`` (SourceModule) and then ``target_net.`` (a GAM checkpoint's adapted
    network, to adapt further); ``diagnose`` asks for ``source_net.`` instead, a GAM run's F_s.
    Errors name ``setting``, the option the file came from. The file is read by
    ``read_weights_file``: a file holding Python objects besides weights is refused, unrun.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        stage_one = os.path.basename(os.path.dirname(path))
        config = stage_one if stage_one.endswith("_source") else "<experiment>_source"
        raise MissingFileError(
            f"{setting}: {path} does not exist; train it with `python -m dam_lightning fit "
            f"--config configs/{config}.yaml` (which saves it there) or set source_steps"
        )
    blob = read_weights_file(path, setting)
    state = network_state_dict(blob, prefixes, path, setting)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        fits = f"{setting}: {path} does not fit {type(net).__name__}"
        raise ConfigError(f"{fits}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{setting}: {path} does not fit {type(net).__name__}: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}; was it "
            "trained with the same net and num_classes?"
        )
    written = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y-%m-%d %H:%M")
    run = checkpoint_origin(blob)
    return f"written {written}" + (f" by the run in {run}" if run else "")


def checkpoint_origin(blob: dict) -> str | None:
    """The run folder a checkpoint was written by, if a ``RunFolder`` recorded it.

    Example:
        >>> checkpoint_origin({"callbacks": {"RunFolder": {"path": "runs/demo/2026-01-02"}}})
        'runs/demo/2026-01-02'
    """
    state = blob.get("callbacks", {}).get("RunFolder") if isinstance(blob, dict) else None
    return state.get("path") if isinstance(state, dict) else None


def _unpickler_detail(message: str) -> str:
    """What torch's weights-only unpickler itself said, without torch's advice around it
    (which suggests ``weights_only=False``, the very thing this module never does)."""
    found = re.search(r"WeightsUnpickler error: *(\S[^\n]*)", message)
    if found:
        return found.group(1)
    for paragraph in re.split(r"\n\s*\n", message):
        paragraph = paragraph.strip()
        skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
        if paragraph and not paragraph.startswith(skip):
            return paragraph.splitlines()[0]
    return (message.splitlines() or [""])[0]


def _holds_python_objects(detail: str) -> bool:
    """Whether the weights-only unpickler refused a Python object (a global: class, function),
    rather than bytes that are no pickle at all (``Unsupported operand``: corrupt)."""
    return bool(re.search(r"GLOBAL |allowlisted|unrecognized function|must be imported", detail))


def _files_in(folder: str) -> str:
    """Advice for a folder given where a file was expected: a checkpoint in it, if any."""
    for pattern in ("checkpoints/last.ckpt", "*.ckpt", "checkpoints/*.ckpt", "*.pt", "*.pth"):
        found = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if found:
            return f"name the file, e.g. {found[0]}"
    return "name the checkpoint (.ckpt) or state dict (.pt) file itself"
