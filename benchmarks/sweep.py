"""Run the experiments of a results table through the CLI, then tabulate their summary.json.

    python -m benchmarks.sweep benchmarks/tables/digits.yaml [--jobs 2] [--runs runs/benchmarks]
    python -m benchmarks.sweep benchmarks/tables/digits.yaml --dry-run      # the commands only
    python -m benchmarks.sweep benchmarks/tables/digits.yaml --report-only  # tabulate what exists

A table file (benchmarks/tables/*.yaml) is data: the report it writes, the seeds, and per table
its rows and columns. A cell's run is ``python -m dam_lightning fit`` with the ``configs`` of the
file, its table, its column and its row, in that order (``args`` likewise), once per seed (every
key of ``seed_args`` set to the seed). With ``source`` configs, a stage-1 run of those configs
(a SourceModule config: it writes ``checkpoints/source.ckpt``) goes first and its checkpoint
becomes the run's ``model.init_args.source_weights``. With ``init`` (``configs`` and
``source``, or ``source`` alone: a stage-1 run) that run goes first and its ``last.ckpt``
(stage 1: ``source.ckpt``) becomes ``model.init_args.init_weights`` (a fine-tune). The cell
shows ``metric`` (percent) of the ``stage`` row of the run's summary.json (default: its last
row, the final network), less the ``minus`` row's; mean ± std over the seeds (``text``: fixed).

Runs go to ``<runs>/[<source's configs>/]<configs>/seed<N>/<date>_<time>/``, one thread each,
``--jobs`` at a time. A run whose folder holds its result (summary.json; stage 1: its checkpoint)
is not run again (the cache); identical runs of several cells or tables run once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
LISTS = ("configs", "source", "args")


@dataclass(frozen=True)
class Run:
    """One CLI command at one seed; ``source`` is the run whose network it starts from: the
    stage-1 run whose checkpoint it adapts, or with ``fine_tune`` the run it fine-tunes."""

    configs: tuple[str, ...]
    args: tuple[str, ...]
    seed: int
    seed_args: tuple[str, ...]
    source: Run | None = None
    stage1: bool = False  # a SourceModule run: it leaves checkpoints/source.ckpt, no summary
    fine_tune: bool = False  # source's network is init_weights, not source_weights

    @property
    def name(self) -> str:
        """``[<source's name>/]<config stems joined by +>[+<hash of args>]/seed<N>``."""
        name = "+".join(Path(c).stem for c in self.configs)
        if self.args:
            name += "+" + hashlib.sha1("\n".join(self.args).encode()).hexdigest()[:8]
        if self.source is not None:  # runs from another source network are other runs
            name = f"{Path(self.source.name).parent}/{name}"
        return f"{name}/seed{self.seed}"

    @property
    def chain(self) -> tuple[Run, ...]:
        """The runs this one starts from, first the earliest, then itself."""
        return (*self.source.chain, self) if self.source else (self,)

    def folder(self, runs: Path) -> Path | None:
        """The latest run folder of this run that holds its result, else None."""
        result = "checkpoints/source.ckpt" if self.stage1 else "summary.json"
        done = sorted((runs / self.name).glob(f"*/{result}"))
        return done[-1].parents[result.count("/")] if done else None

    def command(self, runs: Path) -> list[str]:
        """The CLI command, its run folder under ``runs``."""
        argv = [sys.executable, "-m", "dam_lightning", "fit"]
        for config in self.configs:
            argv += ["--config", config]
        argv += [f"--{key}={self.seed}" for key in self.seed_args]
        if self.source is not None:
            folder = self.source.folder(runs) or runs / self.source.name / "<date>_<time>"
            key = "init_weights" if self.fine_tune else "source_weights"
            weights = "source.ckpt" if self.source.stage1 else "last.ckpt"
            argv.append(f"--model.init_args.{key}={folder}/checkpoints/{weights}")
        return [*argv, *self.args, f"--trainer.logger.init_args.save_dir={runs}",
                f"--trainer.logger.init_args.name={self.name}",
                "--trainer.enable_progress_bar=false"]  # fmt: skip


def merge(*levels) -> dict:
    """Levels of settings, outer first: lists (configs, source, args) concatenate, the rest
    is overridden by the inner level. A bare list stands for ``{"configs": list}``."""
    cell: dict = {}
    for level in levels:
        level = {"configs": level} if isinstance(level, list) else level or {}
        for key, value in level.items():
            cell[key] = cell.get(key, []) + list(value) if key in LISTS else value
    return cell


def cells(spec: dict):
    """The settings of every cell of the file."""
    for table in spec["tables"]:
        for row_spec in table["rows"].values():
            for column_spec in table["columns"].values():
                yield merge(spec, table, column_spec, row_spec)


def cell_runs(spec: dict, cell: dict) -> list[Run]:
    """The runs of one cell, one per seed (none for a text column)."""
    if "text" in cell:
        return []
    seed_args = tuple(spec.get("seed_args", ["seed_everything", "data.seed"]))

    def run(level: dict, seed: int) -> Run:
        """The run of ``level`` (without ``configs``: its stage-1 run), after its upstream."""
        source = tuple(level.get("source", ()))
        stage1 = Run(source, (), seed, seed_args, stage1=True) if source else None
        if "configs" not in level:
            return stage1
        upstream = run(merge(level["init"]), seed) if "init" in level else stage1
        return Run(tuple(level["configs"]), tuple(level.get("args", ())), seed, seed_args,
                   upstream, fine_tune="init" in level)  # fmt: skip
    return [run(cell, seed) for seed in cell.get("seeds", spec["seeds"])]


def run_all(spec: dict, runs_root: Path, jobs: int, dry_run: bool = False) -> None:
    """Every run that has no result yet, each after the runs it starts from."""
    wanted = [run for cell in cells(spec) for run in cell_runs(spec, cell)]
    runs = list(dict.fromkeys(up for run in wanted for up in run.chain))
    for depth in range(max((len(run.chain) for run in runs), default=0)):
        todo = [r for r in runs if len(r.chain) == depth + 1 and r.folder(runs_root) is None]
        if dry_run:
            print("\n".join(shlex.join(run.command(runs_root)) for run in todo))
            continue
        with ThreadPoolExecutor(jobs) as pool:
            codes = pool.map(lambda run: execute(run, runs_root), todo)
            for run, code in zip(todo, codes, strict=True):
                print(f"{'done' if code == 0 else f'FAILED ({code})'}: {run.name}", flush=True)


def execute(run: Run, runs_root: Path) -> int:
    """One run on one thread, its output in ``<runs>/<name>.log``; the exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.setdefault("WANDB_MODE", "disabled")
    log = runs_root / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(run.command(runs_root), cwd=REPO, env=env, stdout=out, stderr=out)
    return done.returncode


def value(run: Run, runs_root: Path, stage: str | None, metric: str, minus: str | None = None):
    """``metric`` (percent) of row ``stage`` (default: the last) of the run's summary.json,
    less that of row ``minus`` when given (a stage's gain, e.g. GAM over Gaussian matching)."""
    folder = run.folder(runs_root)
    if folder is None:
        return None
    summary = json.loads((folder / "summary.json").read_text())
    row = summary[stage] if stage else list(summary.values())[-1]
    base = summary[minus].get(metric, math.nan) if minus else 0.0
    return 100 * (row[metric] - base) if metric in row else None


def mean_std(values: list[float | None], expected: int) -> str:
    if not (values := [v for v in values if v is not None]):
        return "-"
    partial = "" if len(values) == expected else f" (n={len(values)})"
    if len(values) == 1:
        return f"{values[0]:.1f}{partial}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}{partial}"


def options(configs: list[str], args: list[str] = ()) -> str:
    return " ".join([*(f"--config {c}" for c in configs), *args])


def describe(level) -> str:
    """What a file, column or row adds to its runs, for the report."""
    level = merge(level)
    if "text" in level:
        return "fixed figures, not run"
    parts = [f"`{options(level.get('configs', []), level.get('args', []))}`"]
    parts += [f"stage 1 `{options(level['source'])}`"] if level.get("source") else []
    parts += [f"fine-tunes the network of: {describe(level['init'])}"] if "init" in level else []
    parts += [f"summary row '{level['stage']}'"] if "stage" in level else []
    parts += [f"less summary row '{level['minus']}'"] if "minus" in level else []
    parts += [f"{key} {level[key]}" for key in ("metric", "seeds") if key in level]
    return "; ".join(p for p in parts if p != "``") or "nothing more"


def table_lines(spec: dict, table: dict, runs_root: Path) -> list[str]:
    """One table: a cell per row and column, optionally every seed's value, then what each
    column and row runs."""
    columns, rows = table["columns"], table["rows"]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    per_seed = []
    for row, row_spec in rows.items():
        shown = []
        for column, column_spec in columns.items():
            cell = merge(spec, table, column_spec, row_spec)
            if "text" in cell:
                shown.append(str(cell["text"].get(row, "-")))
                continue
            runs = cell_runs(spec, cell)
            metric = cell.get("metric", "acc")
            stage, minus = cell.get("stage"), cell.get("minus")
            found = [value(run, runs_root, stage, metric, minus) for run in runs]
            shown.append(mean_std(found, len(runs)))
            seeds = ", ".join(f"{r.seed}: " + ("-" if v is None else f"{v:.1f}")
                              for r, v in zip(runs, found, strict=True))  # fmt: skip
            per_seed.append(f"| {row} | {column} | {seeds} |")
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    if table.get("per_seed"):
        lines += ["", "Per seed:", "", "| row | column | seed: value |", "|---|---|---|", *per_seed]
    lines += ["", "Runs: the file's configs, then the column's, then the row's:", ""]
    lines += [f"- column {name}: {describe(level)}" for name, level in columns.items()]
    lines += [f"- row {name}: {describe(level)}" for name, level in rows.items()]
    return lines


def paragraph(text: str | None) -> list[str]:
    return [text.strip(), ""] if text else []


def tabulate(spec: dict, runs_root: Path, path: str) -> str:
    """The Markdown report of a table file."""
    seed_args = ", ".join(spec.get("seed_args", ["seed_everything", "data.seed"]))
    base = options(spec.get("configs", []), spec.get("args", []))
    lines = [
        f"# {spec['title']}", "", "Regenerate (runs what is missing, then rewrites this file):",
        "", f"    python -m benchmarks.sweep {path}", "", *paragraph(spec.get("intro")),
        f"Every run is `python -m dam_lightning fit`{f' `{base}`' if base else ''} with a "
        f"column's and then a row's configs, and {seed_args} set to the seed (seeds "
        f"{spec['seeds']} unless a row says otherwise). A cell is the mean ± std over the seeds "
        "of the runs' summary.json (percent; n = the runs found, when fewer).",
    ]  # fmt: skip
    for table in spec["tables"]:
        lines += ["", f"## {table['title']}", "", *paragraph(table.get("intro"))]
        lines += table_lines(spec, table, runs_root)
    lines += ["", *paragraph(spec.get("notes"))]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", help="a file of benchmarks/tables/")
    parser.add_argument("--runs", default="runs/benchmarks", help="where the run folders go")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--dry-run", action="store_true", help="print the missing runs' commands")
    parser.add_argument("--report-only", action="store_true", help="only tabulate")
    parser.add_argument("--report", help="write here instead of the file's report")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(Path(args.table).read_text())
    runs_root = Path(args.runs).resolve()
    if not args.report_only:
        run_all(spec, runs_root, args.jobs, args.dry_run)
    if not args.dry_run:
        report = Path(args.report or REPO / spec["report"])
        report.write_text(tabulate(spec, runs_root, args.table))
        print(f"wrote {report}")


if __name__ == "__main__":
    main()
