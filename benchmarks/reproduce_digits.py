"""Reproduce the paper's digits tables with the project's own API (paper Tables 1 and 2).

    python benchmarks/reproduce_digits.py --root ../shared/data/digits

For MNIST->USPS and USPS->MNIST it trains LeNet on the source (SourceModule), then runs every
row of Table 1 as a GAMAdaptModule configuration (source only, Gaussian matching only, ADDA,
ADDA + weight drift, GAM without weight drift, GAM full, configured as the authors' released
digits code), two variants the paper does not report (GAM full with the Gaussian matching stage
added, once or at every epoch) and a supervised-on-target row, for several seeds, and writes
mean ± std to docs/results/digits.md with a plot. With --label-shift it adds Table 2 (half of
the odd/even digits removed from one domain).

Protocol: with the full MNIST and USPS training splits under --root it runs the paper's protocol
(train splits); with only the test splits (as in ../shared/data/digits) it runs the reduced
protocol: source = one test set, target = the other. Both are transductive like the official
code: the target images adapted to are the ones scored. Every figure is the final checkpoint's:
no model selection on target labels.

Results are cached per (setting, row, seed) in a JSON file, one per iteration counts and
protocol (benchmarks/.cache/digits_source2000_adapt2000_reduced.json), so an interrupted run
resumes and a run with other settings never replaces them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Subset

from dam_lightning.callbacks import GaussianMatching
from dam_lightning.data import MNIST, USPS, DomainAdaptationDataModule, LabelShift, RandomAffine
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule, SourceModule
from dam_lightning.runs import atomic_torch_save

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for benchmarks/machine.py
from machine import command_line, describe  # noqa: E402

BOTH_LAYERS = {"fc3": 0.1, "fc4": 1.0}
# The GAM rows follow the authors' released digits code (tools/train_adda.py of their ADDA
# fork): discriminators on fc3 (weight 0.1) and fc4, mean-per-tensor weight drift, and no
# Gaussian matching step. Gaussian matching is the paper's stage 2; the last two rows add it to
# GAM (full), once before adaptation or again at every epoch, to show what it does to digits.
# A row: GAMAdaptModule arguments (layers, drift_weight, optionally others such as drift_anchor)
# and "gaussian": the GaussianMatching arguments, or None for no Gaussian matching.
ADAPTATION_ROWS = {
    "Gaussian matching only": dict(layers={}, drift_weight=0.0, gaussian=dict(every_n_epochs=1)),
    "ADDA": dict(layers={"fc4": 1.0}, drift_weight=0.0, gaussian=None),
    "ADDA + weight drift": dict(layers={"fc4": 1.0}, drift_weight=1.0, gaussian=None),
    "GAM without weight drift": dict(layers=BOTH_LAYERS, drift_weight=0.0, gaussian=None),
    "GAM (full)": dict(layers=BOTH_LAYERS, drift_weight=1.0, gaussian=None),
    "GAM (full) + Gaussian matching once": dict(
        layers=BOTH_LAYERS, drift_weight=1.0, gaussian=dict(every_n_epochs=0)
    ),
    "GAM (full) + Gaussian matching every epoch": dict(
        layers=BOTH_LAYERS, drift_weight=1.0, gaussian=dict(every_n_epochs=1)
    ),
}
TABLE1_ROWS = ["source only", *ADAPTATION_ROWS, "supervised on target"]
AUGMENTED_ROWS = TABLE1_ROWS[:-1]  # the supervised row never uses the source network
PAPER_TABLE1 = {
    "MNIST->USPS": {"source only": "77.8", "ADDA": "90.2 ± 0.9", "ADDA + weight drift":
                    "90.5 ± 0.5", "GAM without weight drift": "95.6 ± 0.6", "GAM (full)":
                    "95.7 ± 0.5", "supervised on target": "96.4"},
    "USPS->MNIST": {"source only": "70.7", "ADDA": "97.2 ± 0.4", "ADDA + weight drift":
                    "97.4 ± 0.6", "GAM without weight drift": "97.8 ± 0.6", "GAM (full)":
                    "98.0 ± 0.5", "supervised on target": "99.9"},
}  # fmt: skip
LABEL_SHIFT = {  # setting: (direction, which domain loses half of its odd/even digits)
    "odd MNIST->USPS": ("MNIST->USPS", "source", "odd"),
    "even MNIST->USPS": ("MNIST->USPS", "source", "even"),
    "MNIST->odd USPS": ("MNIST->USPS", "target", "odd"),
    "MNIST->even USPS": ("MNIST->USPS", "target", "even"),
}
PAPER_TABLE2 = {
    "odd MNIST->USPS": ("47.8", "50.5"),
    "even MNIST->USPS": ("37.1", "42.8"),
    "MNIST->odd USPS": ("87.6", "72.8"),
    "MNIST->even USPS": ("73.7", "80.1"),
}


# Source augmentation (not in the paper; dam_lightning.data.RandomAffine) by name. The digits
# differ in size: USPS digits fill their frame, MNIST digits its middle 20x20 of 28x28 (MNIST's
# documented normalisation). "shrink" scales the source digits to 70-100% of their size (USPS
# digits down to MNIST's), "enlarge" to 100-140% (MNIST digits up to USPS's); both also rotate
# by up to 10 degrees and shift by up to 1.4 pixels.
SOURCE_AUGMENTATIONS = {"shrink": dict(zoom=(0.7, 1.0)), "enlarge": dict(zoom=(1.0, 1.4))}
# The one that brings the source digits to the target's size (known without any target label).
TOWARD_TARGET_SIZE = {"USPS->MNIST": "shrink", "MNIST->USPS": "enlarge"}


def source_augmentation(name: str | None) -> RandomAffine | None:
    """The RandomAffine of SOURCE_AUGMENTATIONS[name], or None for no augmentation."""
    return None if name is None else RandomAffine(**SOURCE_AUGMENTATIONS[name])


def source_schedule(iterations: int, augment: str | None) -> int | str:
    """The name of a source training schedule: 2000, or "2000_shrink" with augmentation."""
    return iterations if augment is None else f"{iterations}_{augment}"


def detect_protocol(root: str) -> str:
    """'paper' when both training splits are present, else 'reduced' (test splits only)."""
    try:
        MNIST(root, split="train")
        USPS(root, split="train")
        return "paper"
    except FileNotFoundError:
        return "reduced"


def load_domains(direction: str, root: str, protocol: str):
    split = "train" if protocol == "paper" else "test"
    mnist, usps = MNIST(root, split=split), USPS(root, split=split)
    return (mnist, usps) if direction == "MNIST->USPS" else (usps, mnist)


def _trainer(max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def evaluate(module, net, target) -> float:
    loader = torch.utils.data.DataLoader(target, batch_size=1000)
    return 100 * module.task.evaluate(net, loader, module.device)["acc"]


def weights_dir(folder: Path, schedule: int | str) -> Path:
    """Where the source networks of one training ``schedule`` (see source_schedule: 2000, or
    "2000_shrink" with augmentation) are kept: one folder per schedule, so runs with another
    schedule never pick up these weights."""
    path = Path(folder) / f"source{schedule}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_weights(
    workdir: Path, direction: str, seed: int, iterations: int, augment: str | None = None
) -> Path:
    """The file of the source network of ``direction`` and ``seed`` trained for ``iterations``
    with ``augment`` (a SOURCE_AUGMENTATIONS name or None), in its schedule's folder."""
    folder = weights_dir(workdir, source_schedule(iterations, augment))
    return folder / f"{direction.replace('->', '_')}_seed{seed}.pt"


def train_supervised(
    labelled, target, seed: int, iterations: int, weights: Path, augment=None
) -> float:
    """SourceModule on ``labelled`` for ``iterations`` batches (with ``augment`` applied to the
    batches if given); returns accuracy on ``target`` (labels only score) and saves the
    network's weights."""
    L.seed_everything(seed, verbose=False)
    module = SourceModule(LeNet, num_classes=10, augment=augment)
    data = DomainAdaptationDataModule(labelled, target, batch_size=128, seed=seed)
    _trainer(iterations).fit(module, data)
    atomic_torch_save(module.net.state_dict(), weights)
    return evaluate(module, module.net, target)


def supervised_on_target(target, seed: int, iterations: int, weights: Path) -> float:
    """The upper bound: LeNet trained on the labels of a random half of the target images and
    scored on the other half (scoring the images it was trained on would only measure
    memorisation: 100%)."""
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(order) // 2
    train, held_out = Subset(target, order[:half]), Subset(target, order[half:])
    train.num_classes = held_out.num_classes = target.num_classes
    return train_supervised(train, held_out, seed, iterations, weights)


def adapt(row: dict, source, target, seed: int, iterations: int, weights: Path) -> float:
    """One adaptation row of Table 1 from the given source weights; final-checkpoint accuracy."""
    module = adapt_module(row, source, target, seed, iterations, weights)
    return evaluate(module, module.target_net, target)


def adapt_module(
    row: dict, source, target, seed: int, iterations: int, weights: Path, callbacks=()
) -> GAMAdaptModule:
    """Run one adaptation row (see ADAPTATION_ROWS) and return the adapted module; extra
    ``callbacks`` run first."""
    L.seed_everything(seed, verbose=False)
    module_args = {k: v for k, v in row.items() if k != "gaussian"}
    module = GAMAdaptModule(LeNet, num_classes=10, source_weights=str(weights), **module_args)
    data = DomainAdaptationDataModule(source, target, batch_size=128, seed=seed)
    callbacks = list(callbacks)
    if row["gaussian"] is not None:
        callbacks.append(GaussianMatching(calibration_batches=10, **row["gaussian"]))
    if not row["layers"] and row["drift_weight"] == 0:  # Gaussian only: no optimiser step
        trainer = _trainer(-1, callbacks)
        trainer.fit_loop.max_epochs = 1
        trainer.limit_train_batches = 1
    else:
        steps_per_batch = 2 if row["layers"] else 1
        trainer = _trainer(steps_per_batch * iterations, callbacks)
    trainer.fit(module, data)
    return module


class ResultCache:
    """Accuracies keyed by 'setting/row/seed', with each run's own wall time in seconds,
    written atomically after every run. Several calls may share one cache file (say one per
    direction, in parallel): each save re-reads the file under a lock and adds its own runs."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        stored = json.loads(path.read_text()) if path.exists() else {}
        if stored.get("meta", {}).get("config") != meta["config"]:
            stored = {"meta": meta, "runs": {}}  # other settings: start over
        self.data = stored

    def get_or_run(self, key: str, run, *args) -> float:
        """The cached value for ``key``, else ``run(*args)``, stored."""
        if key not in self.data["runs"]:
            start = time.perf_counter()
            value = run(*args)
            seconds = time.perf_counter() - start
            self.save({key: value}, {key: seconds})
            print(f"{key}: {value:.2f}  ({seconds:.0f} s)", flush=True)
        return self.data["runs"][key]

    def compute_minutes(self) -> float:
        """The summed wall time of every cached run, in minutes."""
        return sum(self.data.get("seconds", {}).values()) / 60

    def save(self, runs: dict, seconds: dict) -> None:
        """Add ``runs`` (and their ``seconds``) to the file, keeping what other calls wrote."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            stored = json.loads(self.path.read_text()) if self.path.exists() else {}
            if stored.get("meta") == self.data["meta"]:
                self.data["runs"] = {**stored["runs"], **self.data["runs"]}
                self.data["seconds"] = {**stored.get("seconds", {}), **self.data.get("seconds", {})}
            self.data["runs"].update(runs)
            self.data.setdefault("seconds", {}).update(seconds)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)


def run_table1(args, protocol: str, cache: ResultCache, workdir: Path) -> dict:
    """Table 1: for each direction and seed, the source network, then the chosen rows from it;
    with --augmented-rows, the same again from a source network trained with augmentation.
    Networks are kept in ``workdir``'s folder per source schedule (weights_dir)."""
    results: dict = {}
    for direction in args.directions:
        source, target = load_domains(direction, args.root, protocol)
        tag = direction.replace("->", "_")
        plain = weights_dir(workdir, args.source_iterations)
        settings = [(direction, None, args.rows)] if args.rows else []  # (setting, augment, rows)
        if args.augmented_rows:
            augment = TOWARD_TARGET_SIZE[direction]
            settings.append((augmented_setting(direction), augment, args.augmented_rows))
        for seed in args.seeds:
            for setting, augment, rows in settings:
                weights = source_weights(workdir, direction, seed, args.source_iterations, augment)
                values = run_rows(args, cache, setting, rows, source, target, seed, weights,
                                  augment)  # fmt: skip
                for name, value in values.items():
                    results.setdefault((setting, name), []).append(value)
            if "supervised on target" not in args.rows:
                continue
            results.setdefault((direction, "supervised on target"), []).append(
                cache.get_or_run(
                    f"{direction}/supervised on target/{seed}", supervised_on_target, target, seed,
                    args.source_iterations, plain / f"{tag}_oracle{seed}.pt",
                )
            )  # fmt: skip
    return results


def augmented_setting(direction: str) -> str:
    """The Table 1 setting of ``direction`` with an augmented source: "USPS->MNIST +shrink"."""
    return f"{direction} +{TOWARD_TARGET_SIZE[direction]}"


def run_rows(args, cache, setting, rows, source, target, seed, weights, augment) -> dict:
    """'source only' (training the source network into ``weights``, with ``augment``: a
    SOURCE_AUGMENTATIONS name or None) and then the ADAPTATION_ROWS among ``rows`` from it;
    accuracies by row name, cached under '<setting>/<row>/<seed>'."""
    train = (source, target, seed, args.source_iterations, weights, source_augmentation(augment))
    values = {"source only": cache.get_or_run(f"{setting}/source only/{seed}", train_supervised,
                                              *train)}  # fmt: skip
    if not weights.exists():  # accuracy cached but weights lost: retrain them
        train_supervised(*train)
    for name, row in ADAPTATION_ROWS.items():
        if name in rows:
            values[name] = cache.get_or_run(
                f"{setting}/{name}/{seed}", adapt, row, source, target, seed,
                args.adapt_iterations, weights,
            )  # fmt: skip
    return values


def run_table2(args, protocol: str, cache: ResultCache, workdir: Path) -> dict:
    results: dict = {}
    folder = weights_dir(workdir, args.source_iterations)
    for setting, (direction, domain, drop) in LABEL_SHIFT.items():
        source, target = load_domains(direction, args.root, protocol)
        if domain == "source":
            source = LabelShift(source, drop=drop, fraction=0.5, seed=0)
        else:
            target = LabelShift(target, drop=drop, fraction=0.5, seed=0)
        for seed in label_shift_seeds(args):
            weights = folder / f"shift_{setting.replace(' ', '_').replace('->', '_')}_{seed}.pt"
            before = cache.get_or_run(
                f"{setting}/no adaptation/{seed}",
                train_supervised, source, target, seed, args.source_iterations, weights,
            )  # fmt: skip
            if not weights.exists():
                train_supervised(source, target, seed, args.source_iterations, weights)
            after = cache.get_or_run(
                f"{setting}/GAM/{seed}", adapt, ADAPTATION_ROWS["GAM (full)"], source, target,
                seed, args.adapt_iterations, weights,
            )  # fmt: skip
            results.setdefault((setting, "no adaptation"), []).append(before)
            results.setdefault((setting, "GAM"), []).append(after)
    return results


def label_shift_seeds(args) -> list[int]:
    return args.label_shift_seeds or args.seeds


def mean_std(values: list[float], expected_runs: int) -> str:
    if not values:
        return "-"
    partial = "" if len(values) == expected_runs else f" (n={len(values)})"
    if len(values) == 1:
        return f"{values[0]:.1f}{partial}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}{partial}"


def tables_from_cache(cache: ResultCache) -> tuple[dict, dict]:
    """Table 1 and Table 2 cells from whatever runs the cache holds (for --report-only)."""
    table1: dict = {}
    table2: dict = {}
    for key, value in cache.data["runs"].items():
        setting, row, _seed = key.split("/")
        (table2 if setting in LABEL_SHIFT else table1).setdefault((setting, row), []).append(value)
    return table1, table2


def write_report(args, protocol, table1, table2, command: str, compute_minutes: float) -> None:
    lines = [
        "# Digits: reproduction of the paper's Tables 1 and 2",
        "",
        "Produced by:",
        "",
        f"    {command}",
        "",
        f"Machine: {describe()}. "
        + f"Compute: {compute_minutes:.0f} min, the summed wall time of the runs in the cache "
        "(an interrupted call resumes from it).",
        "",
        f"Protocol: **{protocol}** "
        + (
            "(MNIST test 10,000 and USPS test 2,007 only: source = one test set, target = the "
            "other, scored on the target images adapted to)"
            if protocol == "reduced"
            else "(full training splits; target scored on its training images, as the paper's code)"
        )
        + f". Seeds: {args.seeds}. Source training {args.source_iterations} iterations, "
        f"adaptation {args.adapt_iterations} iterations (the paper: 10,000 each), batch 128. "
        "Accuracy (%) of the final network on the target; mean ± std over seeds. The "
        "supervised row trains on the labels of half of the target images and scores the other "
        "half.",
    ]
    lines += plain_table(args, table1)
    lines += augmented_table(args, table1)
    if table2:
        lines += [
            "",
            "## Table 2: label shift (half of the odd or even digits removed)",
            "",
            f"Seeds: {label_shift_seeds(args)}. GAM = the GAM (full) row's configuration.",
            "",
            "| setting | no adaptation (ours) | GAM (ours) | no adaptation (paper) | GAM (paper) |",
            "|---|---|---|---|---|",
        ]
        for setting in LABEL_SHIFT:
            runs = len(label_shift_seeds(args))
            before = mean_std(table2.get((setting, "no adaptation"), []), runs)
            after = mean_std(table2.get((setting, "GAM"), []), runs)
            lines.append(
                f"| {setting} | {before} | {after} | " + " | ".join(PAPER_TABLE2[setting]) + " |"
            )
    lines += ["", f"![Table 1]({Path(args.report).with_suffix('.png').name})", ""]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines))
    plot(args, table1, Path(args.report).with_suffix(".png"))


def plain_table(args, table1) -> list[str]:
    """Report lines of Table 1 (no source augmentation); none when no such run was made."""
    if not any((d, r) in table1 for d in args.directions for r in TABLE1_ROWS):
        return []
    return ["", "## Table 1", "", *comparison_table(args, table1, TABLE1_ROWS, str, str)]


def augmented_table(args, table1) -> list[str]:
    """Report lines of Table 1 with an augmented source, for the rows the cache holds."""
    rows = [r for r in AUGMENTED_ROWS
            if any((augmented_setting(d), r) in table1 for d in args.directions)]  # fmt: skip
    if not rows:
        return []
    zooms = "; ".join(
        f"{d}: {TOWARD_TARGET_SIZE[d]}, zoom {SOURCE_AUGMENTATIONS[TOWARD_TARGET_SIZE[d]]['zoom']}"
        for d in args.directions
    )
    return [
        "",
        "## Table 1 with an augmented source (not in the paper)",
        "",
        "The same rows from source networks trained with dam_lightning.data.RandomAffine: every "
        "source image scaled toward the target's digit size (USPS digits fill the frame, MNIST "
        "digits its middle 20x20), rotated by up to 10 degrees and shifted by up to 1.4 pixels. "
        f"{zooms}. No target label is used; adaptation itself is unchanged. Seeds and "
        "iterations as above.",
        "",
        *comparison_table(
            args, table1, rows, augmented_setting, lambda d: f"{d}, {TOWARD_TARGET_SIZE[d]}"
        ),  # fmt: skip
    ]


def comparison_table(args, table1, rows, setting, column) -> list[str]:
    """A Markdown table of ``rows``: per direction ``d`` our mean ± std of the runs of
    ``setting(d)`` (column ``column(d)``), then the paper's figures."""
    lines = [
        "| approach | "
        + " | ".join(f"{column(d)} (ours)" for d in args.directions)
        + " | "
        + " | ".join(f"{d} (paper)" for d in args.directions)
        + " |",
        "|---|" + "---|" * (2 * len(args.directions)),
    ]
    for row in rows:
        ours = [mean_std(table1.get((setting(d), row), []), len(args.seeds))
                for d in args.directions]  # fmt: skip
        paper = [PAPER_TABLE1[d].get(row, "-") for d in args.directions]
        lines.append(f"| {row} | " + " | ".join(ours + paper) + " |")
    return lines


def plot(args, table1, path: Path) -> None:
    """Bars of Table 1, one colour per direction; the augmented-source runs (hatched) beside
    them where the cache holds them. A row a series has no run for gets no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(d, d, "", f"C{i}") for i, d in enumerate(args.directions)]
    series += [(augmented_setting(d), f"{d}, {TOWARD_TARGET_SIZE[d]} source", "//", f"C{i}")
               for i, d in enumerate(args.directions)]  # fmt: skip
    series = [s for s in series if any((s[0], r) in table1 for r in TABLE1_ROWS)]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(series)
    for i, (setting, label, hatch, colour) in enumerate(series):
        rows = [(x, table1[(setting, r)]) for x, r in enumerate(TABLE1_ROWS)
                if (setting, r) in table1]  # fmt: skip
        xs = [x + i * width for x, _ in rows]
        means = [statistics.mean(v) for _, v in rows]
        stds = [statistics.stdev(v) if len(v) > 1 else 0 for _, v in rows]
        edge = "white" if hatch else None
        ax.bar(xs, means, width, yerr=stds, label=label, capsize=2, hatch=hatch, color=colour,
               edgecolor=edge)  # fmt: skip
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(TABLE1_ROWS))])
    ax.set_xticklabels(TABLE1_ROWS, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("target accuracy (%)")
    ax.set_ylim(40, 100)
    ax.legend(
        fontsize=7, ncol=len(series), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--directions", nargs="+", default=["MNIST->USPS", "USPS->MNIST"])
    parser.add_argument("--source-iterations", type=int, default=10000)
    parser.add_argument("--adapt-iterations", type=int, default=10000)
    parser.add_argument(
        "--rows",
        nargs="*",
        default=TABLE1_ROWS,
        choices=TABLE1_ROWS,
        metavar="ROW",
        help="which Table 1 rows to run (default: all; 'source only' runs whenever another row "
        "does, they start from its network); none (a bare --rows) with --augmented-rows runs "
        "only those",
    )
    parser.add_argument(
        "--augmented-rows",
        nargs="+",
        default=[],
        choices=AUGMENTED_ROWS,
        metavar="ROW",
        help="also run these rows from source networks trained with source augmentation (not "
        "in the paper): RandomAffine scaling the source digits toward the target's digit size, "
        "'shrink' for USPS->MNIST, 'enlarge' for MNIST->USPS (TOWARD_TARGET_SIZE); a second "
        "Table 1 in the report",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own); 1 for calls run side by side, e.g. one "
        "per --directions sharing one --cache",
    )
    parser.add_argument("--label-shift", action="store_true", help="also run Table 2")
    parser.add_argument(
        "--label-shift-seeds",
        type=int,
        nargs="+",
        help="seeds for Table 2 (default: --seeds); fewer to save time",
    )
    parser.add_argument("--report", default="docs/results/digits.md")
    parser.add_argument(
        "--cache",
        help="the results cache (default: benchmarks/.cache/digits_source<S>_adapt<A>_"
        "<protocol>.json, one file per setting, so runs with other iteration counts never "
        "replace these)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the runs cached so far (cells show n when incomplete)",
    )
    return parser.parse_args(argv)


def default_cache(args, protocol: str) -> Path:
    """The cache file of this setting, e.g. .cache/digits_source2000_adapt2000_reduced.json."""
    name = f"digits_source{args.source_iterations}_adapt{args.adapt_iterations}_{protocol}.json"
    return Path("benchmarks/.cache") / name


def _result_arguments(argv: list[str]) -> list[str]:
    """The arguments that decide the results (not where the cache and report go, nor threads)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--report-only":
            skip = False
            continue
        if arg in ("--cache", "--report", "--threads"):
            skip = True
            continue
        kept.append(arg)
    return kept


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("high")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = detect_protocol(args.root)
    print(f"Protocol: {protocol} ({args.root})", flush=True)
    # What decides a run's result; seeds, directions and --label-shift only choose which runs
    # to do, so a later call with more of them reuses the runs already cached.
    config = {
        "source_iterations": args.source_iterations,
        "adapt_iterations": args.adapt_iterations,
    }
    cache_path = Path(args.cache or default_cache(args, protocol))
    cache = ResultCache(cache_path, {"config": {**config, "protocol": protocol}})
    workdir = cache_path.parent / "weights"
    if args.report_only:
        table1, table2 = tables_from_cache(cache)
    else:
        table1 = run_table1(args, protocol, cache, workdir)
        table2 = run_table2(args, protocol, cache, workdir) if args.label_shift else {}
    given = _result_arguments(sys.argv[1:] if argv is None else argv)
    command = command_line("reproduce_digits.py", given)
    write_report(args, protocol, table1, table2, command, cache.compute_minutes())
    print(Path(args.report).read_text())


if __name__ == "__main__":
    main()
