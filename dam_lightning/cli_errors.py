"""How the command line shows an error: a ``DamError`` (``dam_lightning.errors``) anywhere in the
chain of causes becomes one line, ``error: <message>``; anything else keeps its traceback.

Also the touches that make that line point at the fix: a long list is cut to a few items and a
count, a misspelt key gets "did you mean", a value of the wrong shape gets the accepted form, and
a key or a missing dataset is named as the user would type it. Nothing here raises or decides
whether a command fails.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Iterable

import yaml

from dam_lightning.errors import DamError

MAX_LINE = 300
"""An error line longer than this has its long lists cut (``shorten_lists``)."""

DATASETS_DOC = {"GTA5": "Segmentation", "Cityscapes": "Segmentation", "SYNTHIA": "Segmentation"}
"""The section of docs/datasets.md that says where each dataset's files come from (the digits
datasets' own errors say how to get their files)."""


def user_message(err: BaseException) -> str | None:
    """The message of the outermost ``DamError`` in ``err``'s chain of causes, long lists cut
    (``shorten_lists``); None if there is none (a bug, or an error of Lightning or torch: those
    keep their traceback)."""
    for candidate in _error_chain(err):
        if isinstance(candidate, DamError):
            return shorten_lists(_own_message(candidate))
    return None


def _own_message(err: DamError) -> str:
    # A DataLoader worker's error comes back in the main process with its own type, but torch
    # (2.14, ``ExceptionWrapper.reraise``) passes only the type and the formatted traceback, so
    # the message is that text: "Caught X in DataLoader worker process 0. Original Traceback
    # ... <module>.X: <message>". The message is what follows the last "<module>.X: ".
    text = str(err)
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    if text.startswith(f"Caught {type(err).__name__} ") and name in text:
        return text.rsplit(name, 1)[1].strip()
    return text


# ---- long lists ------------------------------------------------------------------------------

_LIST = re.compile(r"(?P<names>[^\s,]+(?:, [^\s,]+){7,})(?P<bracket> \([^)]*\))?")


def shorten_lists(message: str, limit: int = MAX_LINE, keep: int = 5) -> str:
    """``message`` with every list of more than ``keep + 2`` comma-separated names cut to its
    first ``keep``, a count and its last (with the words in brackets after it), when the message
    is longer than ``limit``: a line that names 160 layers is read by nobody, a line that names
    6 and says how many more is.

    Example:
        >>> shorten_lists("Valid: " + ", ".join(f"l{i}" for i in range(100)) + ".", limit=50)
        'Valid: l0, l1, l2, l3, l4, ... (94 more), l99.'
    """
    if len(message) <= limit:
        return message

    def cut(found: re.Match) -> str:
        items = found["names"].split(", ")
        last, bracket = items[-1], found["bracket"] or ""
        more = len(items) - keep - 1
        return ", ".join(items[:keep]) + f", ... ({more} more), {last}{bracket}"

    return _LIST.sub(cut, message)


# ---- a config that does not parse ---------------------------------------------------------------


def short_parse_error(
    message: str,
    ex: BaseException | None,
    options: Iterable[str] = (),
    config_files: Iterable[str] = (),
) -> str:
    """One line for a config that does not parse: the keys named along jsonargparse's chain of
    errors joined into one dotted key, and the innermost message (the library's own, where it
    raised one). A key that is not accepted gets the closest accepted one (``options``: the
    parser's dotted keys; a class's init arguments are read from the class) and the config file
    in ``config_files`` that holds it; a value of the wrong shape gets the accepted form.
    jsonargparse (4.53) names a key only in its messages' text (``Parser key "model"``): it has
    no public attribute for it."""
    texts = [message] + [str(e) for e in (_error_chain(ex) if ex is not None else [])]
    keys = dict.fromkeys(k for text in texts for k in re.findall(r'Parser key "([^"]+)"', text))
    detail = user_message(ex) if ex is not None else None
    if detail is None:
        lines = [line.strip() for line in texts[-1].splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("Parser key")]
        detail = " ".join(lines[:3]) if lines else message
    key = ".".join(keys)
    detail = _accepted_form(key, detail)
    detail += _unknown_key_hint("\n".join(texts), key, list(options), list(config_files))
    line = f"{key}: {detail}" if key and not detail.startswith(key) else detail
    return shorten_lists(line)


def _accepted_form(key: str, detail: str) -> str:
    """jsonargparse's ``Expected a <class 'tuple'>. Got value: 512x1024`` as the form it
    accepts, written with the numbers the user gave: ``[512, 1024]``."""
    found = re.match(r"Expected a <class '(tuple|list)'>\. Got value: (.*)$", detail)
    if not found:
        return detail
    numbers = re.findall(r"-?\d+(?:\.\d+)?", found.group(2))
    if len(numbers) > 1:
        example = f"[{', '.join(numbers)}]"
    else:  # nothing to reuse: a size's form, else the bare form of a list
        example = "[512, 1024]" if key.endswith("size") else "[x, y]"
    option = f"--{cli_key(key)}" if key else "the option"
    return (
        f"expected a list such as {example}, got {found.group(2)!r}: in a config write "
        f"{example}, on the command line {option} '{example}'"
    )


def cli_key(key: str) -> str:
    """A key as jsonargparse names it in errors (``data.source.transform.size``) as the user
    types it (``data.source.init_args.transform.size``): the ``init_args`` of a class given by
    ``class_path`` (``model``, ``data.<dataset>``) written out.

    Example:
        >>> cli_key("data.source.transform.size"), cli_key("model.drift_weight")
        ('data.source.init_args.transform.size', 'model.init_args.drift_weight')
    """
    parts = key.split(".")
    if parts[0] == "model" and len(parts) > 1 and parts[1] != "init_args":
        parts.insert(1, "init_args")
    elif parts[0] == "data" and len(parts) > 2 and parts[2] != "init_args":
        parts.insert(2, "init_args")
    return ".".join(parts)


def _unknown_key_hint(text: str, key: str, options: list[str], config_files: list[str]) -> str:
    """`` (did you mean 'drift_weight'?; in overlay.yaml)`` for a key that is not accepted
    (``key``: where jsonargparse found it): the closest accepted key (difflib; a key that moved
    into a nested setting, ``size`` -> ``transform.size``, by its name) and the config file
    that holds the bad one; else the keys the class accepts; '' for any other error."""
    bad, candidates, owner = _bad_key(text, options)
    if bad is None:
        return ""
    hints = []
    moved = [c for c in candidates if c.endswith(f".{bad}")]
    close = moved or difflib.get_close_matches(bad, candidates, n=1, cutoff=0.6)
    if close:
        hints.append(f"did you mean {close[0]!r}?")
    elif candidates and owner:
        shown = [c for c in candidates if "." not in c]
        hints.append(f"{owner} accepts: {', '.join(sorted(shown))}")
    holder = config_file_holding(f"{key}.{bad}" if key else bad, config_files)
    if holder:
        hints.append(f"in {holder}")
    return f" ({'; '.join(hints)})" if hints else ""


def _bad_key(text: str, options: list[str]) -> tuple[str | None, list[str], str | None]:
    """The key jsonargparse refused, the keys it would have accepted in its place, and the
    class that accepts them (None for the parser's own keys)."""
    refused = re.search(r"Option '([^']+)' is not accepted", text) or re.search(
        r"unrecognized arguments: --([^\s=]+)", text
    )
    if refused:
        # the class is named after the message (a nested ``Got value: Namespace(class_path=
        # 'X'``) or, else, last before it (``Problem with given class_path 'X'``)
        after = re.search(r"class_path='([^']+)'", text[refused.end() :].split("\n", 1)[0])
        before = re.findall(r"given class_path '([^']+)'", text[: refused.start()])
        owner = after.group(1) if after else (before[-1] if before else None)
        if owner:
            keys = init_arguments(owner) + nested_fields(owner)
            return refused.group(1), keys, owner.rsplit(".", 1)[-1]
    found = re.search(r"does not accept option '([^']+)'", text) or refused
    if found:
        return found.group(1), [o for o in options if not o.endswith(".help")], None
    return None, [], None


def nested_fields(class_path: str) -> list[str]:
    """``argument.field`` for each init argument of ``class_path`` that takes a dataclass (a
    dataset's ``transform``: ``transform.size``...); [] where the annotations do not resolve.

    Example:
        >>> "transform.size" in nested_fields("dam_lightning.data.GTA5")
        True
    """
    module, _, name = class_path.rpartition(".")
    try:
        init = getattr(importlib.import_module(module), name).__init__
        hints = typing.get_type_hints(init)
    except (ImportError, AttributeError, ValueError, NameError, TypeError):
        return []
    fields = []
    for argument, annotation in hints.items():
        for kind in (annotation, *typing.get_args(annotation)):
            if dataclasses.is_dataclass(kind):
                fields += [f"{argument}.{f.name}" for f in dataclasses.fields(kind)]
    return fields


def init_arguments(class_path: str) -> list[str]:
    """The keyword arguments a class accepts (its own and, through ``**kwargs``, its bases');
    [] for a class that cannot be imported.

    Example:
        >>> "drift_weight" in init_arguments("dam_lightning.modules.GAMAdaptModule")
        True
    """
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def config_file_holding(key: str, config_files: Iterable[str]) -> str | None:
    """The first of ``config_files`` that sets the dotted ``key`` (``model.drift_wieght``, in
    the file ``model: {init_args: {drift_wieght: ...}}``: ``init_args`` levels are skipped);
    None if none does (the key came from the command line).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        ...     _ = f.write("model:\\n  init_args:\\n    drift_wieght: 1.0\\n")
        >>> config_file_holding("model.drift_wieght", [f.name]) == f.name
        True
    """
    wanted = [part for part in key.split(".") if part != "init_args"]
    for path in config_files:
        try:
            with open(path, encoding="utf-8") as f:
                content = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if wanted in _key_paths(content):
            return path
    return None


def _key_paths(content, prefix: tuple = ()) -> list[list[str]]:
    """Every dotted path of keys in a loaded YAML file, ``init_args`` levels skipped."""
    paths = []
    if isinstance(content, dict):
        for name, value in content.items():
            path = prefix if name == "init_args" else (*prefix, str(name))
            paths.append(list(path))
            paths += _key_paths(value, path)
    return paths


# ---- pointers to the fix ------------------------------------------------------------------------


def point_at_fix(message: str, data_keys: dict[str, list[str]] | None = None) -> str:
    """``message`` with what the user needs to act on it: where a dataset whose files are
    missing comes from (the section of docs/datasets.md), and a dataset's keyword argument
    (``size_mismatch="resize"``) as the option the user types (``--data.source.init_args.
    size_mismatch resize``). ``data_keys`` maps a dataset's class name to the data keys that
    hold it in the config (``{"GTA5": ["source"]}``)."""
    dataset = re.match(r"(\w+)(?: root '[^']*' is not a folder|: no files match )", message)
    if dataset and dataset.group(1) in DATASETS_DOC:
        section = DATASETS_DOC[dataset.group(1)]
        message += f" (where to get it: docs/datasets.md, section {section!r})"
    owner = re.match(r"(\w+)", message)
    keys = (data_keys or {}).get(owner.group(1) if owner else "", [])
    if len(keys) == 1:
        message = re.sub(
            r'\b(\w+)="(\w+)"', lambda m: f"--data.{keys[0]}.init_args.{m[1]} {m[2]}", message
        )
    return message


def _error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes, outermost first."""
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return chain
