"""Where a run's files go, and how they are written without ever leaving a half-written file."""

from __future__ import annotations

import os
import tempfile

import lightning as L


def run_directory(trainer: L.Trainer) -> str:
    """The folder of this run: ``save_dir/name/version`` of its logger, the same folder that
    ``ModelCheckpoint`` puts ``checkpoints/`` in; ``default_root_dir`` without a logger."""
    if len(trainer.loggers) != 1:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(save_dir, str(logger.name), version)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename, so a crash or
    a kill leaves either the old file or the new one, never a truncated one. The file gets the
    permissions of any other new file (``0o666`` less the umask), not mkstemp's private 0o600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """``atomic_write_bytes`` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def unused_path(path: str) -> str:
    """``path`` if free, else ``stem-1.ext``, ``stem-2.ext``...: never overwrite an earlier run.

    The name is claimed by creating an empty file with ``O_EXCL``, so two runs started at the
    same moment can never get the same one; the caller then overwrites that file.
    """
    stem, ext = os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    candidate, n = path, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{stem}-{n}{ext}"
