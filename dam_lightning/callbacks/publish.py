"""``PublishCheckpoint``: the stable name under which a finished stage leaves its network.

Stage 1 writes into a new run folder every time; stage 2 must still find "the source network I
just trained" under one path that never goes stale. This callback saves the final network of a
successful fit to that path (atomically, so the next stage never reads half a file) and says
so; a failed or interrupted fit leaves the previous one in place.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from dam_lightning.errors import ConfigError


class PublishCheckpoint(L.Callback):
    """At the end of a successful ``fit``, save a checkpoint of the final weights to ``path``,
    replacing the one an earlier run left there only once the new file is complete.

    The checkpoint records the run folder it came from, which ``GAMAdaptModule`` reports when it
    loads the file as ``source_weights``. Under DDP every process takes part in the save and
    rank 0 writes it.

    Args:
        path: where the next stage reads the network, e.g. ``runs/mnist_usps_source/source.ckpt``
            (the ``source_weights`` of ``configs/mnist_usps.yaml``).

    Example:
        >>> PublishCheckpoint("runs/demo/source.ckpt").path
        'runs/demo/source.ckpt'
    """

    def __init__(self, path: str):
        if not path:
            raise ConfigError("PublishCheckpoint needs a path, e.g. runs/<experiment>/source.ckpt")
        self.path = path
        self.published: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
        # every rank: the save is collective. A full checkpoint, said explicitly (Lightning logs
        # "`weights_only` was not set" otherwise); loading never runs code (dam_lightning.weights)
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
            self.published = self.path
            rank_zero_info(f"Network for the next stage saved as {self.path}")
