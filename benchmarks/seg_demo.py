"""The segmentation demo over several seeds and target variants, through the real CLI.

    python benchmarks/seg_demo.py [--seeds 0 1 2] [--variants uci mnist usps] [--split test]
                                  [--jobs 2] [--out docs/results/seg_demo.md] [-- CLI overrides]

Each (variant, seed) is one `python -m dam_lightning fit --config configs/seg_demo.yaml ...`
process on one thread (at most --jobs at a time), with every seed of the config set to the seed
(network init, data order, scene layouts, SynDigits glyphs). It reads the run's summary.json
and log.txt and writes a Markdown report: per seed and mean ± std of the table's columns, and
where the time went (from the log's timestamps). --split val scores the validation fifth of
the target digits, for choosing a recipe; the reported tables use test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import command_line, provenance  # noqa: E402

VARIANTS = {
    "uci": ("UCIDigits (scikit-learn), the demo", []),
    "mnist": ("MNIST test split", ["--config", "configs/seg_demo_mnist.yaml"]),
    "usps": ("USPS test split", ["--config", "configs/seg_demo_usps.yaml"]),
}
STAGES = ("source only", "after Gaussian matching", "after GAM")
COLUMNS = ("pixel_acc", "class_acc", "miou", "worst_class_iou")


def seed_arguments(seed: int) -> list[str]:
    """Every seed of configs/seg_demo.yaml set to ``seed``."""
    keys = [
        "seed_everything", "data.seed", "data.source.init_args.seed",
        "data.source.init_args.digits.init_args.seed", "data.target.init_args.seed",
        "data.target_val.init_args.seed",
    ]  # fmt: skip
    return [f"--{key}={seed}" for key in keys]


def run_cli(arguments: list[str]) -> str:
    """``python -m dam_lightning <arguments>`` in the repository, on one thread, W&B offline;
    its stdout. A failure raises with the command and the end of its output."""
    command = [sys.executable, "-m", "dam_lightning", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def run_folder(stdout: str) -> Path:
    """The run folder a CLI command printed ("Run folder: ...")."""
    return REPO / re.search(r"^Run folder: (\S+)", stdout, re.M).group(1)


def run_one(variant: str, seed: int, split: str, extra: list[str], name: str) -> dict:
    """One CLI run; returns its summary rows, its wall time and its phase times."""
    start = time.perf_counter()
    stdout = run_cli([
        "fit", "--config", "configs/seg_demo.yaml", *VARIANTS[variant][1], *seed_arguments(seed),
        f"--data.target_val.init_args.split={split}", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.name={name}", *extra,
    ])  # fmt: skip
    wall = time.perf_counter() - start
    folder = run_folder(stdout)
    rows = json.loads((folder / "summary.json").read_text())
    return {
        "variant": variant, "seed": seed, "split": split, "wall_s": wall, "rows": rows,
        "phases": phase_times((folder / "log.txt").read_text()), "folder": str(folder),
    }  # fmt: skip


def phase_times(log: str) -> dict[str, float]:
    """Seconds per phase from log.txt's timestamps: source training, Gaussian matching (with
    the source-only evaluation before it), adaptation (with the evaluation after matching),
    final evaluation and the end of the run."""
    stamps = {}
    marks = {
        "start": "Training the source network",
        "source trained": "Source network trained",
        "matched": "Gaussian matching at epoch",
        "adapted": "`Trainer.fit` stopped",
    }
    for line in log.splitlines():
        for key, text in marks.items():
            if text in line and key not in stamps:
                stamps[key] = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    keys = list(marks)
    return {
        f"{a} -> {b}": (stamps[b] - stamps[a]).total_seconds()
        for a, b in zip(keys, keys[1:], strict=False)
        if a in stamps and b in stamps
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def report(results: list[dict], split: str, command: str) -> str:
    lines = [*provenance(command, "; one thread per run, up to two runs at a time"), ""]
    lines += [f"Scored on the target's `{split}` fifth of the digit images (scenes no "
              "adaptation scene shares a digit image with).", ""]  # fmt: skip
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines += [f"### Target: {VARIANTS[variant][0]} — seeds {seeds}, mean ± std", ""]
        lines += ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for stage in STAGES:
            cells = [mean_std([r["rows"][stage][c] for r in runs]) for c in COLUMNS]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        lines += ["", "Per seed, mIoU (GAM - source only, GAM - Gaussian matching):", ""]
        lines += ["| seed | source only | after Gaussian matching | after GAM | GAM - source | "
                  "GAM - Gaussian | wall time (s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in runs:
            m = [100 * r["rows"][s]["miou"] for s in STAGES]
            cells = [f"{v:.1f}" for v in m] + [f"{m[2] - m[0]:+.1f}", f"{m[2] - m[1]:+.1f}"]
            lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
        lines += ["", "Where the time went (seconds, from log.txt; per seed):", ""]
        phases = list(runs[0]["phases"])
        lines += ["| seed | " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
        for r in runs:
            lines.append(f"| {r['seed']} | " + " | ".join(f"{r['phases'].get(p, float('nan')):.0f}"
                                                         for p in phases) + " |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["uci"], choices=list(VARIANTS))
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--name", default="seg_demo_bench", help="the runs' experiment name")
    parser.add_argument("--out", default="docs/results/seg_demo_table.md")
    parser.add_argument("overrides", nargs="*", help="CLI overrides after --")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the runs it starts (OMP_NUM_THREADS=1): the machine line says so
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(
            pool.map(lambda job: run_one(*job, args.split, args.overrides, args.name), jobs)
        )
    for r in results:
        m = [100 * r["rows"][s]["miou"] for s in STAGES]
        print(f"{r['variant']} seed {r['seed']}: mIoU {m[0]:.1f} / {m[1]:.1f} / {m[2]:.1f} "
              f"({r['wall_s']:.0f} s, {r['folder']})", flush=True)  # fmt: skip
    arguments = ["--seeds", *map(str, args.seeds), "--variants", *args.variants]
    arguments += ["--split", args.split, "--out", args.out]
    arguments += ["--", *args.overrides] if args.overrides else []
    text = report(results, args.split, command_line("seg_demo.py", arguments))
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
