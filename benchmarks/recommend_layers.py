"""Does ``diagnose``'s layer recommendation help? GAM with the recommended layers against GAM
with the default layers and against output-only matching (ADDA), on MNIST <-> USPS and on the
offline segmentation demo.

    python benchmarks/recommend_layers.py [--directions MNIST->USPS USPS->MNIST]
        [--seeds 10 11 12] [--workers 1] [--report docs/results/recommend_layers.md]
    python benchmarks/recommend_layers.py --seg-demo [--seg-seeds 20 21]
        [--report docs/results/recommend_layers_seg_demo.md]

For each direction and seed: the source network of gaussian_ablation/confusion (LeNet, 2,000
iterations on the source, shared weights in benchmarks/.cache/weights/source2000/, trained when
absent), then ``diagnose_datamodule`` on it (10 calibration batches of 128 per domain, every
foldable layer, the documented rule ``dam_lightning.diagnosis.RULE``; no label is read), then
three adaptations from the same source network with the same seed, 2,000 iterations each, as
the digits tables' rows (reproduce_digits.ADAPTATION_ROWS):

- ADDA: the output layer only, no weight drift;
- GAM, default layers: fc3 (0.1) + fc4 (1.0), weight drift (the configs' and Table 1's);
- GAM, recommended layers: the diagnosis's ``{layer: weight}``, weight drift.

Scored on the fixed validation half of the target images (gaussian_ablation's), seeds 10-12
(the README tables use 0-2). The adapted networks of the default-layer rows are kept
(benchmarks/.cache/weights/adapted2000/) for benchmarks/few_shot.py. Each run uses one thread,
``--workers`` in parallel; results are cached per run, so an interrupted call resumes.

--seg-demo runs the same comparison through the real CLI (benchmarks/seg_demo.py's runs, one
thread each, one at a time) on configs/seg_demo.yaml, every seed set to each of --seg-seeds
(the README's demo and docs/results/seg_demo_table.md use 0-2; the recipe was chosen on 10-11),
scored on the target's validation fifth: the demo as configured (default layers: ERFNet layers
4, 8, 12 and the output), then `python -m dam_lightning diagnose` on that run's checkpoint
(its F_s: the demo trains F_s inside the command, and the same seed trains the same F_s in the
later runs: the report checks that their source-only rows are equal), then the demo with
the recommended `layers` and with configs/ablations/adda.yaml (output only, no drift). Every
run keeps the demo's Gaussian matching stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts
import gaussian_ablation as A  # noqa: E402
import reproduce_digits as R  # noqa: E402
import seg_demo as S  # noqa: E402
from machine import command_line, provenance, report_and_cache  # noqa: E402

from dam_lightning.data import DomainAdaptationDataModule  # noqa: E402
from dam_lightning.diagnosis import diagnose_datamodule  # noqa: E402
from dam_lightning.models import LeNet  # noqa: E402
from dam_lightning.runs import atomic_torch_save  # noqa: E402

SOURCE_ITERATIONS = 2000
CALIBRATION_BATCHES = 10
ROWS = {  # row name: the reproduce_digits row it runs (layers replaced for "recommended")
    "ADDA (output only)": "ADDA",
    "GAM, default layers": "GAM (full)",
    "GAM, recommended layers": "GAM (full)",
}


def adapted_weights(workdir: str, direction: str, seed: int, iterations: int) -> Path:
    """Where the default-layer GAM network of ``direction`` and ``seed`` is kept."""
    folder = Path(workdir) / f"adapted{iterations}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{direction.replace('->', '_')}_seed{seed}_gam.pt"


def recommend(job: dict) -> dict:
    """The diagnosis of the job's source network: the recommendation and the per-layer
    A-distances before/after Gaussian matching."""
    torch.set_num_threads(1)
    source, target = R.load_domains(job["direction"], job["root"], job["protocol"])
    weights = A.source_network(job, source, target)
    net = LeNet(num_classes=10)
    net.load_state_dict(torch.load(weights))
    data = DomainAdaptationDataModule(source, target, batch_size=128, seed=job["seed"])
    start = time.perf_counter()
    diagnosis = diagnose_datamodule(net.eval(), data, CALIBRATION_BATCHES, progress=False)
    return {
        "recommendation": diagnosis.recommendation,
        "a_distance_before": {r.name: r.a_distance_before for r in diagnosis.layers},
        "a_distance_after": {r.name: r.a_distance_after for r in diagnosis.layers},
        "seconds": time.perf_counter() - start,
    }


def adapt(job: dict) -> dict:
    """One adaptation row; accuracy (%) of F_s and of the adapted F_t on the validation half."""
    torch.set_num_threads(1)
    source, target = R.load_domains(job["direction"], job["root"], job["protocol"])
    weights = A.source_network(job, source, target)
    validation, _ = A.validation_halves(target)
    row = dict(R.ADAPTATION_ROWS[ROWS[job["row"]]])
    if job["row"] == "GAM, recommended layers":
        row["layers"] = job["layers"]
    start = time.perf_counter()
    module = R.adapt_module(row, source, target, job["seed"], job["iterations"], weights)
    if job["row"] == "GAM, default layers":
        path = adapted_weights(job["workdir"], job["direction"], job["seed"], job["iterations"])
        atomic_torch_save(module.target_net.state_dict(), path)
    network = LeNet(num_classes=10)
    network.load_state_dict(torch.load(weights))
    return {
        "source_only": R.evaluate(module, network, validation),
        "adapted": R.evaluate(module, module.target_net.cpu(), validation),
        "layers": row["layers"],
        "seconds": time.perf_counter() - start,
    }


def key(job: dict, part: str) -> str:
    return f"{job['direction']}/{job['seed']}/{job['iterations']}/{part}"


def plan(args, protocol: str) -> list[dict]:
    return [
        dict(root=args.root, protocol=protocol, workdir=args.workdir, direction=direction,
             seed=seed, iterations=args.iterations, source_iterations=SOURCE_ITERATIONS,
             augment=None)
        for direction in args.directions
        for seed in args.seeds
    ]  # fmt: skip


def run(pool, jobs: list[dict], cache: dict, cache_path: Path) -> None:
    """Diagnoses first (one per source network, which also trains it), then the rows."""
    todo = [j for j in jobs if key(j, "diagnosis") not in cache]
    for job, result in zip(todo, pool.map(recommend, todo), strict=True):
        cache[key(job, "diagnosis")] = result
        A.save_cache(cache_path, cache)
        print(f"{key(job, 'diagnosis')}: {result['recommendation']}", flush=True)
    rows = [
        {**j, "row": row, "layers": cache[key(j, "diagnosis")]["recommendation"]}
        for j in jobs
        for row in ROWS
        if key(j, row) not in cache
    ]
    for job, result in zip(rows, pool.map(adapt, rows), strict=True):
        cache[key(job, job["row"])] = result
        A.save_cache(cache_path, cache)
        print(f"{key(job, job['row'])}: {result['adapted']:.2f}", flush=True)


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def layers_text(layers: dict) -> str:
    return ", ".join(f"{name} {weight:g}" for name, weight in layers.items())


def direction_lines(args, direction: str, cache: dict) -> list[str]:
    """The per-seed table of one direction (a row not run is "not run"), the mean over the
    seeds that have every row, and the comparisons per seed."""
    jobs = [j for j in plan(args, "") if j["direction"] == direction]
    lines = [
        f"### {direction}",
        "",
        "| seed | source only | ADDA (output only) | GAM, default layers | "
        "GAM, recommended layers | recommended layers (weight) |",
        "|---|---|---|---|---|---|",
    ]
    columns: dict[str, list[float]] = {"source only": [], **{row: [] for row in ROWS}}
    verdicts = []
    for job in jobs:
        runs = {row: cache.get(key(job, row)) for row in ROWS}
        diagnosis = cache.get(key(job, "diagnosis"))
        done = [r for r in runs.values() if r is not None]
        if diagnosis is None or not done:
            continue
        cells = [f"{r['adapted']:.1f}" if r else "not run" for r in runs.values()]
        lines.append(
            f"| {job['seed']} | {done[0]['source_only']:.1f} | " + " | ".join(cells)
            + f" | {layers_text(diagnosis['recommendation'])} |"
        )  # fmt: skip
        if len(done) < len(runs):
            missing = [row for row, r in runs.items() if r is None]
            verdicts.append(f"- seed {job['seed']}: {', '.join(missing)} not run (time); the "
                            "seed is left out of the means.")  # fmt: skip
            continue
        columns["source only"].append(done[0]["source_only"])
        for row, result in runs.items():
            columns[row].append(result["adapted"])
        verdicts.append(_verdict(job["seed"], {row: r["adapted"] for row, r in runs.items()}))
    if len(columns["source only"]) > 1:
        lines.append(
            f"| **mean ± std of {len(columns['source only'])}** | "
            + " | ".join(f"**{mean_std(values)}**" for values in columns.values())
            + " | |"
        )
    seconds = {
        row: [cache[key(j, row)]["seconds"] for j in jobs if key(j, row) in cache] for row in ROWS
    }
    times = ", ".join(
        f"{row} {statistics.mean(values) / 60:.0f} min" for row, values in seconds.items() if values
    )
    cost = [f"- Wall time per adaptation (mean; one thread on a shared, loaded CPU): {times}."]
    return [*lines, "", *verdicts, *(cost if times else []), ""]


def _verdict(seed: int, accuracy: dict[str, float]) -> str:
    """One line per seed: the recommendation against each alternative, in points."""
    recommended = accuracy["GAM, recommended layers"]
    parts = [
        f"{recommended - accuracy[other]:+.1f} against {other}"
        for other in ("GAM, default layers", "ADDA (output only)")
    ]
    return f"- seed {seed}: recommended layers {', '.join(parts)}."


def diagnosis_lines(args, cache: dict) -> list[str]:
    """The A-distances the recommendation was made from, per direction and seed."""
    lines = [
        "## What the recommendation read (proxy A-distance, before -> after Gaussian matching)",
        "",
    ]
    for direction in args.directions:
        for job in (j for j in plan(args, "") if j["direction"] == direction):
            diagnosis = cache.get(key(job, "diagnosis"))
            if diagnosis is None:
                continue
            cells = ", ".join(
                f"{name} {before:.2f} -> {diagnosis['a_distance_after'][name]:.2f}"
                for name, before in diagnosis["a_distance_before"].items()
            )
            lines.append(f"- {direction}, seed {job['seed']}: {cells}")
    return [*lines, ""]


def write_report(args, protocol: str, cache: dict, command: str) -> str:
    minutes = sum(v.get("seconds", 0) for v in cache.values()) / 60
    lines = [
        "# The layer recommendation of `diagnose` against the default layers and ADDA (digits)",
        "",
        *provenance(
            command,
            f"; each run on one thread, {args.workers} in parallel. Compute: {minutes:.0f} min "
            "(diagnoses and adaptations, summed)."
            + (
                " Written from the cached runs (`--report-only`); the same command without it "
                "makes the runs (every missing one)."
                if args.report_only
                else ""
            ),
        ),  # fmt: skip
        "",
        f"Protocol: {protocol} (source = one test split, target = the other). Per seed one "
        f"source network (LeNet, {SOURCE_ITERATIONS} iterations), diagnosed with "
        f"`diagnose_datamodule` ({CALIBRATION_BATCHES} calibration batches of 128 per domain, "
        "the rule `dam_lightning.diagnosis.RULE`: the output layer plus, in each of 3 depth "
        "bands, the layer with the highest A-distance left after Gaussian matching if >= 0.2, "
        "weighted by that A-distance), then adapted three ways with the same seed for "
        f"{args.iterations} iterations: ADDA (output layer, no drift), GAM with the default "
        "layers (fc3 0.1 + fc4 1.0, weight drift) and GAM with the recommended layers (weight "
        "drift). No Gaussian matching stage in any row (as the digits tables). Accuracy (%) on "
        "the fixed validation half of the target images (gaussian_ablation's, permutation seed "
        f"{A.VALIDATION_PERMUTATION_SEED}); seeds {args.seeds}, not the README tables' 0-2.",
        "",
        "## Accuracy on the validation half of the target",
        "",
    ]
    for direction in args.directions:
        lines += direction_lines(args, direction, cache)
    lines += diagnosis_lines(args, cache)
    text = "\n".join(lines)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    return text


SEG_ROWS = {  # row name: CLI arguments after the demo's (None: the recommended layers)
    "GAM, default layers": [],
    "GAM, recommended layers": None,
    "ADDA (output only)": ["--config", "configs/ablations/adda.yaml"],
}


def seg_diagnose(seed: int, checkpoint: str) -> dict:
    """`python -m dam_lightning diagnose` on the demo run's checkpoint (its F_s), with the
    demo's data for ``seed``; returns diagnose.json."""
    start = time.perf_counter()
    stdout = S.run_cli([
        "diagnose", "--config", "configs/seg_demo.yaml", *S.seed_arguments(seed),
        "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.name=recommend_seg_demo", f"--ckpt_path={checkpoint}",
    ])  # fmt: skip
    folder = S.run_folder(stdout)
    result = json.loads((folder / "diagnose.json").read_text())
    result["seconds"] = time.perf_counter() - start
    result["folder"] = str(folder)
    return result


def seg_run(seed: int, row: str, layers: dict | None) -> dict:
    extra = SEG_ROWS[row] if SEG_ROWS[row] is not None else [
        f"--model.init_args.layers={json.dumps(layers)}"
    ]  # fmt: skip
    return S.run_one("uci", seed, "val", extra, "recommend_seg_demo")


def run_seg_demo(args, cache: dict, cache_path: Path) -> None:
    for seed in args.seg_seeds:
        if f"seg_demo/{seed}/GAM, default layers" not in cache:
            cache[f"seg_demo/{seed}/GAM, default layers"] = seg_run(
                seed, "GAM, default layers", None
            )
            A.save_cache(cache_path, cache)
        default = cache[f"seg_demo/{seed}/GAM, default layers"]
        if f"seg_demo/{seed}/diagnosis" not in cache:
            checkpoint = Path(default["folder"]) / "checkpoints" / "last.ckpt"
            cache[f"seg_demo/{seed}/diagnosis"] = seg_diagnose(seed, str(checkpoint))
            A.save_cache(cache_path, cache)
        recommendation = cache[f"seg_demo/{seed}/diagnosis"]["recommendation"]["layers"]
        print(f"seg_demo/{seed}: recommended {recommendation}", flush=True)
        for row in ("GAM, recommended layers", "ADDA (output only)"):
            if f"seg_demo/{seed}/{row}" not in cache:
                cache[f"seg_demo/{seed}/{row}"] = seg_run(seed, row, recommendation)
                A.save_cache(cache_path, cache)
            print(f"seg_demo/{seed}/{row}: {cache[f'seg_demo/{seed}/{row}']['rows']['after GAM']}")


def same_source_lines(args, cache: dict) -> list[str]:
    """Whether each seed's rows started from the same F_s (equal source-only scores): the
    recommendation was made from the first run's F_s and is only fair if the others have it."""
    lines = []
    for seed in args.seg_seeds:
        scores = {
            row: cache[f"seg_demo/{seed}/{row}"]["rows"]["source only"]["miou"]
            for row in SEG_ROWS
            if f"seg_demo/{seed}/{row}" in cache
        }
        same = len(set(scores.values())) <= 1
        verdict = "the same F_s in every row" if same else f"**F_s differs between rows**: {scores}"
        lines.append(f"- seed {seed}: source-only mIoU equal across the rows: {verdict}.")
    return lines


def seg_report(args, cache: dict, command: str) -> str:
    """The seg demo's table: mIoU after each stage per seed and row, and the recommendations."""
    lines = [
        "# The layer recommendation of `diagnose` on the segmentation demo",
        "",
        *provenance(command, "; one thread per run, one run at a time"),
        "",
        "configs/seg_demo.yaml with every seed set to the row's seed, scored on the target's "
        "validation fifth of the digit images (`--data.target_val.init_args.split=val`). The "
        "source network is trained inside each run; the same seed should train the same one "
        "(checked below: equal source-only scores). Every row keeps the demo's Gaussian "
        "matching stage; they differ in the adversarial stage only: default layers (ERFNet "
        "layers 4, 8, 12 and the output, weight 1 each, drift), the layers `diagnose` "
        "recommended from the first run's checkpoint (drift), or the output only without drift "
        "(configs/ablations/adda.yaml). mIoU (%) over the 11 classes.",
        "",
        "| seed | row | source only | after Gaussian matching | after GAM | pixel acc after GAM "
        "| wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    after: dict[str, list[float]] = {row: [] for row in SEG_ROWS}
    for seed in args.seg_seeds:
        for row in SEG_ROWS:
            run = cache.get(f"seg_demo/{seed}/{row}")
            if run is None:
                continue
            m = [100 * run["rows"][stage]["miou"] for stage in S.STAGES]
            after[row].append(m[2])
            lines.append(
                f"| {seed} | {row} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} | "
                f"{100 * run['rows']['after GAM']['pixel_acc']:.1f} | {run['wall_s']:.0f} |"
            )
    lines += ["", *same_source_lines(args, cache)]
    lines += ["", "Mean mIoU after GAM over the seeds:", ""]
    lines += [f"- {row}: {mean_std(values)}" for row, values in after.items() if values]
    lines += ["", "Recommended layers (weight), from A-distances after Gaussian matching:", ""]
    for seed in args.seg_seeds:
        diagnosis = cache.get(f"seg_demo/{seed}/diagnosis")
        if diagnosis is None:
            continue
        layers = layers_text(diagnosis["recommendation"]["layers"])
        highest = sorted(diagnosis["layers"], key=lambda r: -(r["a_distance_after"] or 0))[:5]
        top = ", ".join(f"{r['name']} {r['a_distance_after']:.2f}" for r in highest)
        lines.append(f"- seed {seed}: {layers} (diagnose {diagnosis['seconds']:.0f} s; the "
                     f"five highest A-distances after matching: {top})")  # fmt: skip
    text = "\n".join([*lines, ""])
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/digits")
    parser.add_argument(
        "--directions", nargs="+", default=["MNIST->USPS", "USPS->MNIST"],
        choices=list(R.PAPER_TABLE1),
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seg-demo", action="store_true", help="the segmentation demo instead")
    parser.add_argument("--seg-seeds", type=int, nargs="+", default=[20, 21])
    parser.add_argument("--report", help="default docs/results/recommend_layers[_seg_demo].md")
    parser.add_argument("--cache", help="default benchmarks/.cache/<the report's name>.json")
    parser.add_argument("--workdir", default="benchmarks/.cache/weights")
    parser.add_argument(
        "--report-only", action="store_true",
        help="write the report from the cache without running anything (seeds without every "
        "row are listed as not run)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as every run (CLI runs get OMP_NUM_THREADS=1); the report says so
    given = sys.argv[1:] if argv is None else argv
    cache_path = report_and_cache(
        args, "recommend_layers_seg_demo" if args.seg_demo else "recommend_layers"
    )
    cache = A.load_cache(cache_path)
    if args.seg_demo:
        if not args.report_only:
            run_seg_demo(args, cache, cache_path)
        print(seg_report(args, cache, command_line("recommend_layers.py", given)))
        return
    protocol = R.detect_protocol(args.root)
    if not args.report_only:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            run(pool, plan(args, protocol), cache, cache_path)
    print(write_report(args, protocol, cache, command_line("recommend_layers.py", given)))


if __name__ == "__main__":
    main()
