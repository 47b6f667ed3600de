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


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename, so a crash or
    a kill leaves either the old file or the new one, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def unused_path(path: str) -> str:
    """``path`` if free, else ``stem-1.ext``, ``stem-2.ext``...: never overwrite an earlier run."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return candidate
