"""How the command line shows an error: a ``DamError`` (``dam_lightning.errors``) anywhere in the
chain of causes becomes one line, ``error: <message>``; anything else keeps its traceback."""

from __future__ import annotations

import re

from dam_lightning.errors import DamError


def user_message(err: BaseException) -> str | None:
    """The message of the outermost ``DamError`` in ``err``'s chain of causes; None if there is
    none (a bug, or an error of Lightning or torch: those keep their traceback)."""
    for candidate in _error_chain(err):
        if isinstance(candidate, DamError):
            return _own_message(candidate)
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


def short_parse_error(message: str, ex: BaseException | None) -> str:
    """One line for a config that does not parse: the keys named along jsonargparse's chain of
    errors joined into one dotted key, and the innermost message (the library's own, where it
    raised one). jsonargparse (4.53) names a key only in its messages' text
    (``Parser key "model"``): it has no public attribute for it."""
    texts = [message] + [str(e) for e in (_error_chain(ex) if ex is not None else [])]
    keys = dict.fromkeys(k for text in texts for k in re.findall(r'Parser key "([^"]+)"', text))
    detail = user_message(ex) if ex is not None else None
    if detail is None:
        lines = [line.strip() for line in texts[-1].splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("Parser key")]
        detail = " ".join(lines[:3]) if lines else message
    key = ".".join(keys)
    return f"{key}: {detail}" if key and not detail.startswith(key) else detail


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
