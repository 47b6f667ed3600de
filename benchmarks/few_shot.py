"""Few-shot fine-tuning on the target (the paper's Fig. 6): does starting from the GAM-adapted
network beat starting from the source-only one when N labelled target images are available?

    python benchmarks/few_shot.py [--shots 0 5 10 35] [--seeds 10 11 12]
        [--report docs/results/few_shot.md]
    python benchmarks/few_shot.py --seg-demo [--seg-seeds 20]
        [--report docs/results/few_shot_seg_demo.md]

Both parts fine-tune with configs/few_shot.yaml's recipe (read from the file: its max_steps and
learning rate; the base config's weight decay) and the data module's ``few_shot``/
``few_shot_seed`` (``FewShot``: N random target images, nested over N for one seed).

MNIST -> USPS (reduced protocol): from each seed's source network (LeNet, 2,000 iterations) and
its default-layer GAM network (both written by benchmarks/recommend_layers.py, which must have
run first), fine-tune on N labelled images drawn from the target images *outside* the fixed
validation half (gaussian_ablation's), subset seed = the seed, and score the validation half.
N = 0 scores the starting network. Seeds 10-12, as recommend_layers.

Segmentation demo (--seg-demo, through the real CLI): the starting networks are the F_t and
F_s of recommend_layers' default-layer demo run for each seed (its checkpoint; F_s extracted to
a state dict). ``fit --config configs/seg_demo_source.yaml --config configs/few_shot.yaml`` with
the demo's seeds set, N labelled scenes of the target's adaptation scenes, scored on the
validation fifth (``validate`` on the fine-tuned checkpoint, its metrics.json). N = 0 is that
run's own "source only" and "after GAM" rows (same networks, same scenes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts
import gaussian_ablation as A  # noqa: E402
import recommend_layers as RL  # noqa: E402
import reproduce_digits as R  # noqa: E402
import seg_demo as S  # noqa: E402
from machine import command_line, provenance, report_and_cache  # noqa: E402

from dam_lightning.data import DomainAdaptationDataModule  # noqa: E402
from dam_lightning.models import LeNet  # noqa: E402
from dam_lightning.modules import SourceModule  # noqa: E402
from dam_lightning.runs import atomic_torch_save  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / "configs" / "few_shot.yaml"
DIRECTION = "MNIST->USPS"
INITS = ("source only", "GAM")
RECIPES = {  # name: data.few_shot_with_source
    "with the source set": True,  # configs/few_shot.yaml's
    "target images only": False,
}


def overlay_recipe() -> dict:
    """configs/few_shot.yaml's schedule: fine-tuning batches, learning rate, and whether the
    source set is trained on beside the N target images."""
    config = yaml.safe_load(OVERLAY.read_text())
    return {
        "max_steps": config["trainer"]["max_steps"],
        "lr": config["model"]["init_args"]["optimizer"]["init_args"]["lr"],
        "with_source": config["data"]["few_shot_with_source"],
    }


def digits_start(args, seed: int, init: str) -> Path:
    """The starting network's weights for ``init`` (recommend_layers' files)."""
    if init == "GAM":
        path = RL.adapted_weights(args.workdir, DIRECTION, seed, 2000)
    else:
        path = R.source_weights(args.workdir, DIRECTION, seed, RL.SOURCE_ITERATIONS)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run benchmarks/recommend_layers.py first")
    return path


def digits_run(args, seed: int, init: str, shots: int, with_source: bool) -> float:
    """Accuracy (%) on the validation half after fine-tuning on ``shots`` images of the other
    half, beside the source set if ``with_source`` (``shots`` = 0: the starting network)."""
    torch.set_num_threads(1)
    source, target = R.load_domains(DIRECTION, args.root, R.detect_protocol(args.root))
    validation, rest = A.validation_halves(target)
    for subset in (validation, rest):
        subset.num_classes = target.num_classes
    recipe = overlay_recipe()
    start = digits_start(args, seed, init)
    module = SourceModule(
        LeNet, num_classes=10, init_weights=str(start),
        optimizer=lambda p: torch.optim.Adam(p, lr=recipe["lr"], weight_decay=2.5e-5),
    )  # fmt: skip
    if shots == 0:
        module.net.load_state_dict(torch.load(start))
    else:
        L.seed_everything(seed, verbose=False)
        data = DomainAdaptationDataModule(
            source, rest, target_val=validation, batch_size=128, seed=seed, few_shot=shots,
            few_shot_seed=seed, few_shot_with_source=with_source,
        )  # fmt: skip
        R._trainer(recipe["max_steps"]).fit(module, data)
    return R.evaluate(module, module.net, validation)


def digits_key(seed: int, init: str, recipe: str, shots: int) -> str:
    """The cache key of one digits run (N = 0, no fine-tuning, has no recipe)."""
    return f"{DIRECTION}/{seed}/{init}/{shots}" + (f"/{recipe}" if shots else "")


def run_digits(args, cache: dict, cache_path: Path) -> None:
    for seed in args.seeds:
        for recipe, with_source in RECIPES.items():
            for init in INITS:
                for shots in args.shots:
                    key = digits_key(seed, init, recipe, shots)
                    if key not in cache:
                        began = time.perf_counter()
                        accuracy = digits_run(args, seed, init, shots, with_source)
                        cache[key] = {"value": accuracy, "seconds": time.perf_counter() - began}
                        A.save_cache(cache_path, cache)
                    print(f"{key}: {cache[key]['value']:.2f}", flush=True)


def seg_start(seed: int, init: str) -> tuple[str, dict]:
    """The checkpoint (GAM) or extracted F_s state dict (source only) of recommend_layers'
    default-layer demo run for ``seed``, and that run's summary rows."""
    runs = A.load_cache(REPO / "benchmarks" / ".cache" / "recommend_layers_seg_demo.json")
    run = runs.get(f"seg_demo/{seed}/GAM, default layers")
    if run is None:
        raise FileNotFoundError(
            f"no default-layer demo run for seed {seed}: run benchmarks/recommend_layers.py "
            f"--seg-demo --seg-seeds {seed} first"
        )
    checkpoint = Path(run["folder"]) / "checkpoints" / "last.ckpt"
    if init == "GAM":
        return str(checkpoint), run["rows"]
    source = checkpoint.with_name("source_net.pt")
    if not source.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        prefix = "source_net."
        atomic_torch_save(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, source
        )
    return str(source), run["rows"]


def seg_run(seed: int, init: str, shots: int) -> dict:
    """Fine-tune through the CLI, then validate the result; the validation metrics."""
    start, rows = seg_start(seed, init)
    if shots == 0:
        row = rows["after GAM" if init == "GAM" else "source only"]
        return {"miou": row["miou"], "pixel_acc": row["pixel_acc"], "wall_s": 0.0}
    config = ["--config", "configs/seg_demo_source.yaml", "--config", "configs/few_shot.yaml"]
    data = [*S.seed_arguments(seed), "--data.target_val.init_args.split=val"]
    began = time.perf_counter()
    quiet = [
        "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.name=few_shot_bench",
    ]
    out = S.run_cli(["fit", *config, *data, f"--model.init_args.init_weights={start}",
               f"--data.few_shot={shots}", f"--data.few_shot_seed={seed}", *quiet])  # fmt: skip
    folder = S.run_folder(out)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    S.run_cli(["validate", *config, *data, f"--ckpt_path={checkpoint}", *quiet])
    metrics = json.loads(sorted(folder.glob("validate-*/metrics.json"))[-1].read_text())
    return {
        "miou": metrics["val/target/miou"], "pixel_acc": metrics["val/target/pixel_acc"],
        "wall_s": time.perf_counter() - began, "folder": str(folder),
    }  # fmt: skip


def run_seg_demo(args, cache: dict, cache_path: Path) -> None:
    for seed in args.seg_seeds:
        for init in INITS:
            for shots in args.shots:
                key = f"seg_demo/{seed}/{init}/{shots}"
                if key not in cache:
                    cache[key] = seg_run(seed, init, shots)
                    A.save_cache(cache_path, cache)
                print(f"{key}: {100 * cache[key]['miou']:.2f}", flush=True)


def table(shots: list[int], rows: dict, cell) -> list[str]:
    """One row per ``rows`` entry (label: key), one column per N; ``cell(key, n)`` gives the
    values over the seeds."""
    lines = ["| start \\ N labelled target images | " + " | ".join(map(str, shots)) + " |"]
    lines.append("|---|" + "---|" * len(shots))
    for label, key in rows.items():
        lines.append(f"| {label} | " + " | ".join(RL.mean_std(cell(key, n)) for n in shots) + " |")
    return lines


def write_report(args, cache: dict, command: str) -> str:
    recipe = overlay_recipe()
    recipe_text = (
        f"configs/few_shot.yaml's recipe: {recipe['max_steps']} batches, Adam lr {recipe['lr']}"
    )
    minutes = sum(v.get("seconds", v.get("wall_s", 0)) for v in cache.values()) / 60
    lines = [*provenance(command, f"; one thread. Compute: {minutes:.0f} min summed."), ""]
    if args.seg_demo:
        seeds = args.seg_seeds
        lines += [
            "# Few-shot fine-tuning on the segmentation demo (the paper's Fig. 6)",
            "",
            f"{recipe_text}, batch 16, with the source set (`few_shot_with_source: true`: the "
            "3,000 rendered source scenes beside the N target scenes, repeated to as many); N "
            "labelled scenes of the target's adaptation scenes (subset seed = the seed), scored "
            f"on the validation fifth. Seeds {seeds}; the "
            "starting networks are F_s and F_t of recommend_layers' default-layer demo run "
            "of each seed (N = 0: that run's rows). mIoU (%), mean ± std over the seeds:",
            "",
            *table(args.shots, {init: init for init in INITS}, lambda init, n: [
                100 * cache[f"seg_demo/{s}/{init}/{n}"]["miou"] for s in seeds
                if f"seg_demo/{s}/{init}/{n}" in cache
            ]),
        ]  # fmt: skip
    else:
        seeds = args.seeds
        lines += [
            f"# Few-shot fine-tuning on {DIRECTION} (the paper's Fig. 6)",
            "",
            f"Reduced protocol. {recipe_text}, weight decay 2.5e-5, batch 128; N labelled "
            "images drawn from the target images outside the fixed validation half (subset "
            "seed = the seed), accuracy (%) on the validation half. Two recipes: *with the "
            "source set* (configs/few_shot.yaml's `few_shot_with_source: true`: the source "
            "images and the N target images, repeated to as many items, about half of each "
            "batch) and *target images only* (the N images repeated). Starting networks: each "
            "seed's source network (LeNet, 2,000 iterations) and its GAM network (default "
            "layers fc3 0.1 + fc4, weight drift, 2,000 iterations), from "
            f"benchmarks/recommend_layers.py. Seeds {seeds}, mean ± std:",
            "",
            *table(args.shots, {
                f"{init}, {recipe}": (init, recipe) for recipe in RECIPES for init in INITS
            }, lambda key, n: [
                cache[digits_key(s, *key, n)]["value"] for s in seeds
                if digits_key(s, *key, n) in cache
            ]),
        ]  # fmt: skip
    text = "\n".join([*lines, ""])
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/digits")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5, 10, 35])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument("--seg-demo", action="store_true", help="the segmentation demo instead")
    parser.add_argument("--seg-seeds", type=int, nargs="+", default=[20])
    parser.add_argument("--workdir", default="benchmarks/.cache/weights")
    parser.add_argument("--report", help="default docs/results/few_shot[_seg_demo].md")
    parser.add_argument("--cache", help="default benchmarks/.cache/<the report's name>.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as every run (CLI runs get OMP_NUM_THREADS=1); the report says so
    given = sys.argv[1:] if argv is None else argv
    cache_path = report_and_cache(args, "few_shot_seg_demo" if args.seg_demo else "few_shot")
    cache = A.load_cache(cache_path)
    (run_seg_demo if args.seg_demo else run_digits)(args, cache, cache_path)
    print(write_report(args, cache, command_line("few_shot.py", given)))


if __name__ == "__main__":
    main()
