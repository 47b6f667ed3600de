"""The library's errors for a bad input: the command line shows one of these as one line,
``error: <message>`` (docs/errors.md); any other exception is a bug, or an error of Lightning or
torch, and keeps its traceback.

Each subclass is also the builtin exception that the library raised before it had its own
types, so ``except ValueError`` (and ``pytest.raises(FileNotFoundError)``...) still catch it.
"""

from __future__ import annotations


class DamError(Exception):
    """A bad input: its message is the one line the user sees, naming the file, key or value
    and the fix."""


class ConfigError(DamError, ValueError):
    """A setting or argument with a value that cannot work (a key's value, a combination)."""


class DataError(DamError, ValueError):
    """A dataset's files or items that cannot be read or used as they are."""


class WrongTypeError(DamError, TypeError):
    """An object of the wrong kind where the config or a dataset gave one (a module, an item)."""


class MissingFileError(DamError, FileNotFoundError):
    """A file or folder that the config names and that does not exist."""


class NotAFileError(DamError, IsADirectoryError):
    """A folder where the config must name a file."""


class UnreadableFileError(DamError, PermissionError):
    """A file that exists but that this process may not read."""


class SetupError(DamError, RuntimeError):
    """Something the machine lacks that the library needs (fonts, ...)."""


class TrainingStopped(DamError, FloatingPointError):
    """Training diverged (a NaN or infinite loss or weight) and was stopped."""


__all__ = [
    "ConfigError",
    "DamError",
    "DataError",
    "MissingFileError",
    "NotAFileError",
    "SetupError",
    "TrainingStopped",
    "UnreadableFileError",
    "WrongTypeError",
]
