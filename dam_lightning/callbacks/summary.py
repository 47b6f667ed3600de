"""The adaptation summary: target metrics at GAM's three milestones, as a table.

Milestones: the source network as trained ("source only", the no-adaptation baseline), the
target network right after the first Gaussian matching, and the target network at the end.
This callback only evaluates and reports; it never changes a network.
"""

from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from dam_lightning.callbacks.progress import Phase
from dam_lightning.runs import atomic_write_text, run_directory

STARTING_NETWORK = "starting network"
"""The first row of a fine-tune (a SourceModule fit from ``init_weights``): its network before
the first step, scored like the last row (``configs/few_shot.yaml``'s N = 0)."""


class AdaptationSummary(L.Callback):
    """Evaluate on the target validation set at each milestone; print and save the table.

    Reads the ``GAMAdaptModule``'s seam (``train_domains``, ``adapting``, ``source_net``,
    ``target_net``, ``gaussian_report``, ``matched_at_step``); list it after
    ``GaussianMatching`` in ``trainer.callbacks`` so that it sees the matching made before the
    same batch. With a ``SourceModule`` (``train_domains == ("source",)``) the table's row is
    named ``final_label``: its network at the end of the fit, scored on the same set (e.g. the
    paper's "supervised on target" row, ``configs/experiments/*_supervised_half.yaml``), after
    a "starting network" row when the fit fine-tunes ``init_weights`` (``fine_tunes``).

    Writes ``summary.md`` (the task's few summary columns: accuracy for digits; pixel
    accuracy, class accuracy, mIoU and worst-class IoU for segmentation) and ``summary.json``
    (every metric, per-class IoUs included) into the run directory (beside ``checkpoints/``)
    and logs ``summary/<milestone>/<metric>``. Survives resuming: the rows measured before the
    interruption are stored in the checkpoint. Each scoring shows a bar named after its
    milestone (rank 0, when the trainer shows bars) and logs its duration.

    Args:
        final_label: name of the last row (e.g. "after ADDA" for that ablation).

    Example:
        >>> AdaptationSummary().rows
        {}
    """

    def __init__(self, final_label: str = "after GAM"):
        self.final_label = final_label
        self.rows: dict[str, dict[str, float]] = {}

    def _evaluate(self, trainer: L.Trainer, pl_module, net, stage: str) -> dict[str, float]:
        """The metrics of ``net`` on the target validation set, with a bar named after the
        milestone (a full pass over the set takes a while) and its duration in the log."""
        target_val = trainer.datamodule.val_dataloader()[0]
        with Phase(trainer, f"Scoring {stage}", _length(target_val), "batches") as phase:
            return pl_module.task.evaluate(
                net, phase.track(target_val), pl_module.device, "target_val batch"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if _adapts(pl_module):
            due = milestones_due(pl_module, self.rows)
        else:
            due = _starting_network_due(trainer, pl_module, self.rows)
        for stage, net in due:
            self.rows[stage] = self._evaluate(trainer, pl_module, net, stage)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _adapts(pl_module):  # a SourceModule: its network as trained, one row
            stage, net = self.final_label, pl_module.eval_net
        elif pl_module.adapting:
            stage, net = self.final_label, pl_module.target_net
        else:  # the budget ended inside stage 1 (GAMAdaptModule warns): F_s as it stands
            stage, net = "source only (stage 1 unfinished)", pl_module.source_net
        self.rows[stage] = self._evaluate(trainer, pl_module, net, stage)
        metrics = {
            f"summary/{stage.replace(' ', '_')}/{name}": value
            for stage, row in self.rows.items()
            for name, value in row.items()
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        dataset = trainer.datamodule.target_val
        columns = trainer.lightning_module.task.summary_columns
        table = format_table(self.rows, f"Target metrics on {dataset!r}", columns)
        print("\n" + table, flush=True)
        folder = run_directory(trainer)
        atomic_write_text(os.path.join(folder, "summary.md"), table + "\n")
        atomic_write_text(
            os.path.join(folder, "summary.json"), json.dumps(self.rows, indent=2) + "\n"
        )

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = dict(state_dict["rows"])


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable dataset: a bar without a total
        return None


def _adapts(pl_module) -> bool:
    """Whether ``pl_module`` adapts to the target (GAM: it trains on both domains, its
    declared ``train_domains``), or trains one network on labelled data (SourceModule)."""
    return "target" in pl_module.train_domains


def _starting_network_due(trainer, pl_module, done) -> list[tuple[str, object]]:
    """A fine-tune's starting network, due before its first step (not again on resuming)."""
    if pl_module.fine_tunes and trainer.global_step == 0 and STARTING_NETWORK not in done:
        return [(STARTING_NETWORK, pl_module.eval_net)]
    return []


def milestones_due(pl_module, done) -> list[tuple[str, object]]:
    """The milestones reached at this batch and not yet in ``done``, with the network to judge:
    "source only" (F_s, once it is final) and "after Gaussian matching" (F_t, before any
    adaptation step after the first matching). Shared by the summary and the overlays."""
    if not _adapts(pl_module) or not pl_module.adapting:
        return []
    due = [] if "source only" in done else [("source only", pl_module.source_net)]
    if pl_module.gaussian_report is not None and "after Gaussian matching" not in done:
        if pl_module.matched_at_step == pl_module.trainer.global_step:
            due.append(("after Gaussian matching", pl_module.target_net))
        else:  # Python's warnings show it once (one call site)
            rank_zero_warn(
                "the 'after Gaussian matching' milestone was not measured: F_t had already "
                "taken adaptation steps. List GaussianMatching before AdaptationSummary and "
                "StageOverlays in trainer.callbacks"
            )
    return due


def format_table(
    rows: dict[str, dict[str, float]], title: str, columns: tuple[str, ...] | None = None
) -> str:
    """A Markdown table, one row per milestone, metrics in percent; ``columns`` picks and
    orders the metrics shown (default: all, sorted)."""
    metrics = list(columns) if columns else sorted({n for row in rows.values() for n in row})
    width = max([len("stage")] + [len(stage) for stage in rows])
    cell = {m: max(6, len(m)) for m in metrics}
    lines = [
        title,
        "",
        "| " + "stage".ljust(width) + " | " + " | ".join(m.rjust(cell[m]) for m in metrics) + " |",
        "|" + "-" * (width + 2) + "|" + "|".join("-" * (cell[m] + 2) for m in metrics) + "|",
    ]
    for stage, row in rows.items():
        cells = " | ".join(
            f"{100 * row[m]:{cell[m]}.2f}" if m in row else "-".rjust(cell[m]) for m in metrics
        )
        lines.append(f"| {stage.ljust(width)} | {cells} |")
    return "\n".join(lines)
