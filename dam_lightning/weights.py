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
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from dam_lightning.errors import (
    ConfigError,
    DataError,
    MissingFileError,
    NotAFileError,
    UnreadableFileError,
)

log = logging.getLogger(__name__)

NETWORK_PREFIXES = ("net.", "target_net.")
"""Where a network's weights sit in a checkpoint's ``state_dict``: ``net.`` (``SourceModule``),
then ``target_net.`` (``GAMAdaptModule``'s adapted network)."""

DATA_PARALLEL = "module."
"""The prefix ``nn.DataParallel`` and DDP give every key of a network saved through them."""

SHOWN_KEYS = 3
"""How many keys of each kind a mismatch lists before it counts the rest."""


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
    return (  # the whole-model variant of the command is in docs/errors.md
        f"{path} holds Python objects besides weights{what}: not loaded, nothing in it was "
        "executed. If you trust the file, convert it to a state dict: python -c \"import torch; "
        f"torch.save(torch.load({path!r}, weights_only=False)['state_dict'], {out!r})\""
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
    skip_mismatched_classifier: bool = False,
) -> str:
    """Load ``net``'s weights from a ``SourceModule`` checkpoint or a plain state dict; returns
    where the file came from (its run folder, if recorded, and when it was written) and what
    was not loaded as it stands (``load_state``'s notes).

    A Lightning checkpoint's ``state_dict`` is searched for the ``prefixes`` in order: by
    default ``net.`` (SourceModule) and then ``target_net.`` (a GAM checkpoint's adapted
    network, to adapt further); ``diagnose`` asks for ``source_net.`` instead, a GAM run's F_s.
    Any other checkpoint's ``state_dict`` (e.g. the ERFNet authors' ``{'epoch', 'state_dict',
    'optimizer'}``) or a plain state dict is taken whole; ``nn.DataParallel``'s ``module.``
    prefix is removed. A network with a ``translate_weights`` method reads other layouts too
    (``ERFNet``: the authors' files; ``TorchvisionSegmentation``: torchvision's). Loading is
    strict (``load_state``); ``skip_mismatched_classifier`` leaves a classifier of another
    class count initialised. Errors name ``setting``, the option the file came from. The file
    is read by ``read_weights_file``: a file holding Python objects besides weights is refused,
    unrun.
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
    state = strip_prefix(network_state_dict(blob, prefixes, path, setting), DATA_PARALLEL)
    notes = load_state(
        net, state, path, setting, skip_mismatched_classifier=skip_mismatched_classifier
    )
    written = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y-%m-%d %H:%M")
    run = checkpoint_origin(blob)
    origin = f"written {written}" + (f" by the run in {run}" if run else "")
    return "; ".join([origin, *notes])


class Translated(NamedTuple):
    """A file's state dict in a network's own layout (what ``translate_weights`` returns).

    Attributes:
        state: the keys and tensors to load.
        initialised: prefixes of the network's keys the file does not hold on purpose (e.g. the
            decoder, for an encoder-only file): left as initialised, not reported as missing.
        notes: what was dropped or left initialised, one sentence each, for the log.
    """

    state: dict[str, torch.Tensor]
    initialised: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def load_state(
    net: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str,
    setting: str,
    skip_mismatched_classifier: bool = False,
    initialised: Sequence[str] = (),
    translate: bool = True,
    fix: str | None = None,
) -> list[str]:
    """Load ``state`` into ``net`` strictly: every key of the network (but those under the
    ``initialised`` prefixes, and BatchNorm's ``num_batches_tracked``, which files from before
    torch 0.4 lack) must be there, with its shape, and no other key. ``net.translate_weights``,
    if the network has one and ``translate``, first turns a foreign layout into its own.

    A mismatch raises a ``ConfigError`` naming ``setting`` and ``path`` that lists the missing,
    unexpected and wrongly shaped keys (``SHOWN_KEYS`` of each, then a count) and the fix
    (``fix``, where the caller knows it better than the generic advice). With ``skip_mismatched_classifier``, classifier keys (``net.classifier_layers()``, else the
    last layer with parameters) whose shape differs (another class count) are left
    initialised. Returns what was not loaded as it stands, one sentence each; each is also
    logged (``dam_lightning.weights``, warning level).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
        >>> other = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 5)).state_dict()
        >>> load_state(net, other, "five.pt", "weights")
        Traceback (most recent call last):
        ...
        dam_lightning.errors.ConfigError: weights: five.pt does not fit Sequential: 2 wrongly shaped (1.weight: file (5, 3), network (4, 3); 1.bias: file (5,), network (4,)); the file's classifier (1) has 5 classes, the network's 4: set skip_mismatched_classifier: true to load everything else and leave the classifier initialised, or give the network 5 classes
        >>> load_state(net, other, "five.pt", "weights", skip_mismatched_classifier=True)
        ["skipped the classifier 1.weight, 1.bias: the file's has 5 classes, the network's 4; it starts initialised"]
    """  # noqa: E501
    state, initialised, notes = dict(state), tuple(initialised), []
    translator = getattr(net, "translate_weights", None)
    if translate and callable(translator):
        translated = translator(state)
        state = dict(translated.state)
        initialised += tuple(translated.initialised)
        notes += list(translated.notes)
    own = net.state_dict()
    missing = [
        k for k in own
        if k not in state and not k.startswith(initialised)
        and not k.endswith("num_batches_tracked")
    ]  # fmt: skip
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    classifier = _classifier_keys(net, own)
    wrong_classifier = [k for k in wrong if k in classifier]
    if skip_mismatched_classifier and wrong_classifier:
        classes = _class_counts(state, own, wrong_classifier)
        notes.append(
            f"skipped the classifier {', '.join(wrong_classifier)}: the file's has "
            f"{classes[0]} classes, the network's {classes[1]}; it starts initialised"
        )
        state = {k: v for k, v in state.items() if k not in wrong_classifier}
        wrong = [k for k in wrong if k not in wrong_classifier]
        initialised += tuple(wrong_classifier)
    if missing or unexpected or wrong:
        raise ConfigError(
            _mismatch(net, own, state, path, setting, missing, unexpected, wrong, classifier, fix)
        )
    net.load_state_dict(state, strict=False)
    for note in notes:
        log.warning("%s: %s: %s", setting, path, note)
    return notes


def _classifier_keys(net: nn.Module, own: Mapping[str, torch.Tensor]) -> list[str]:
    """The state dict keys of ``net``'s classifier: of ``net.classifier_layers()``, else of its
    last module that holds parameters of its own."""
    layers = getattr(net, "classifier_layers", None)
    if callable(layers):
        names = tuple(layers())
    else:
        owners = [n for n, m in net.named_modules() if any(True for _ in m.parameters(False))]
        names = tuple(owners[-1:])
    return [k for k in own if k.rsplit(".", 1)[0] in names]


def _class_counts(state: Mapping, own: Mapping, keys: Sequence[str]) -> tuple[int, int]:
    """(the file's, the network's) size along the first axis where a classifier key differs."""
    first = keys[0]
    for a, b in zip(state[first].shape, own[first].shape, strict=False):  # ranks may differ
        if a != b:
            return a, b
    return state[first].numel(), own[first].numel()


def _mismatch(net, own, state, path, setting, missing, unexpected, wrong, classifier, fix) -> str:
    """The one-line message of a file that does not fit ``net``: the keys, then the fix."""
    name = type(net).__name__
    parts = [f"{len(missing)} missing ({_few(missing)})"] if missing else []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if wrong:
        shapes = [
            f"{k}: file {tuple(state[k].shape)}, network {tuple(own[k].shape)}"
            for k in wrong[:SHOWN_KEYS]
        ]
        more = f" and {len(wrong) - SHOWN_KEYS} more" if len(wrong) > SHOWN_KEYS else ""
        parts.append(f"{len(wrong)} wrongly shaped ({'; '.join(shapes)}{more})")
    message = f"{setting}: {path} does not fit {name}: {', '.join(parts)}; "
    if wrong and not missing and not unexpected and set(wrong) <= set(classifier):
        file_classes, net_classes = _class_counts(state, own, wrong)
        layer = sorted({k.rsplit(".", 1)[0] for k in wrong})
        return message + (
            f"the file's classifier ({', '.join(layer)}) has {file_classes} classes, the "
            f"network's {net_classes}: set skip_mismatched_classifier: true to load everything "
            f"else and leave the classifier initialised, or give the network {file_classes} "
            "classes"
        )
    if fix:
        return message + fix
    if state and not set(state) & set(own):
        return message + (
            f"none of the file's {len(state)} keys is a key of {name} (the file's start "
            f"{_few(sorted({_head(k) for k in state}))}, the network's "
            f"{_few(sorted({_head(k) for k in own}))}): is it the weights of another network?"
        )
    return message + (
        f"was it saved from the same network ({name} with the same options) and num_classes? "
        "Pass a file of that network, or build the network as the file was"
    )


def _few(keys: Sequence[str]) -> str:
    """The first ``SHOWN_KEYS`` of ``keys``, then how many more."""
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def _head(key: str) -> str:
    """A key's first name with a dot: where in the network it sits."""
    return key.split(".", 1)[0] + "."


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
