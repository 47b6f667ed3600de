"""The figures of the docs, run from the repository root: sample images of each digit domain,
and of the digit-scene domains.

    python docs/figures/make_figures.py [--root ../shared/data/digits]
    python docs/figures/make_figures.py --scenes [--root ../shared/data/digits]
    python docs/figures/make_figures.py --gam-curves RUN_FOLDER [...] --out F.png

Writes docs/figures/digit_domains.png: one row per domain (SynDigits, UCIDigits, and MNIST and
USPS test images when --root holds them), digits 0-9 from left to right. With --scenes, writes
docs/figures/digit_scenes.png instead: for each scene domain of configs/seg_demo*.yaml (source
renders, UCIDigits camera scenes, and MNIST/USPS ones when --root holds them) a row of scenes
and, below it, their label masks (black: the ignored rim). With --gam-curves, plots the
adversarial stage of GAM runs logged with a CSVLogger (``metrics.csv`` in each run folder): per
matched layer, the discriminator's accuracy and F_t's activation gap over the training steps.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dam_lightning.data import MNIST, USPS, DigitScenes, SynDigits, UCIDigits  # noqa: E402


def first_of_each_digit(dataset) -> list:
    images = {}
    for image, label in (dataset[i] for i in range(len(dataset))):
        images.setdefault(int(label), image)
        if len(images) == 10:
            break
    return [images[d] for d in range(10)]


def digit_scenes_figure(root: str, out: str, per_row: int = 6) -> None:
    """Scenes and label masks of each DigitScenes domain of the segmentation demo."""
    from dam_lightning.callbacks.stage_overlays import colour_mask

    domains = {
        "source: SynDigits renders": DigitScenes(SynDigits(400, seed=0), per_row, seed=0),
        "target: UCIDigits scenes": DigitScenes(UCIDigits(), per_row, "test", "camera"),
    }
    try:
        domains["MNIST scenes"] = DigitScenes(MNIST(root, "test"), per_row, "test", "camera")
        domains["USPS scenes"] = DigitScenes(USPS(root, "test"), per_row, "test", "camera")
    except FileNotFoundError as missing:
        print(f"skipping MNIST/USPS: {missing}")
    fig, axes = plt.subplots(2 * len(domains), per_row, figsize=(per_row, 2 * len(domains) + 0.2))
    for row, (name, scenes) in enumerate(domains.items()):
        for col in range(per_row):
            image, label = scenes[col]
            axes[2 * row, col].imshow(image.permute(1, 2, 0).numpy())
            axes[2 * row + 1, col].imshow(colour_mask(label, scenes.palette))
        axes[2 * row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        axes[2 * row + 1, 0].set_ylabel("labels", rotation=0, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    fig.tight_layout(pad=0.2)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def run_curves(run: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{layer: {metric: [(batch, value), ...]}}`` of the ``layer/<layer>/<metric>`` columns of
    a run folder's metrics.csv (CSVLogger), and the target's validation mIoU under ``"target"``
    when the run validated during training."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    with open(Path(run) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("layer/") and value:
                    layer, metric = key.removeprefix("layer/").rsplit("/", 1)
                    curves[layer][metric].append((int(row["step"]), float(value)))
                elif key == "val/target/miou" and value:
                    curves["target"]["mIoU (%)"].append((int(row["step"]), 100 * float(value)))
    return curves


def _natural(name: str) -> list:
    """Sort key: encoder.layers.2 before encoder.layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def gam_curves_figure(runs: list[str], out: str) -> None:
    """Per matched layer, the discriminator's accuracy (acc_d) and F_t's mean activation gap
    (mean_gap), one line per run, over the training batches; then the target's mIoU."""
    per_run = {run: run_curves(run) for run in runs}
    panels = sorted({(layer, metric) for curves in per_run.values()
                     for layer in curves for metric in curves[layer]
                     if metric in ("acc_d", "mean_gap", "mIoU (%)")},
                    key=lambda panel: _natural(panel[0]))  # fmt: skip
    layers = list(dict.fromkeys(layer for layer, _ in panels))
    fig, axes = plt.subplots(2, len(layers), figsize=(3 * len(layers), 5), squeeze=False)
    for axis in axes.flat:
        axis.set_visible(False)
    for layer, metric in panels:
        axis = axes[0 if metric != "mean_gap" else 1, layers.index(layer)]
        axis.set_visible(True)
        for run, curves in per_run.items():
            if points := curves[layer].get(metric):
                axis.plot(*zip(*points, strict=True), label=Path(run).parent.name, lw=1)
        axis.set_title(f"{layer}\n{metric}", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("training batch", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout(pad=0.3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/digits")
    parser.add_argument("--out", default=None, help="default docs/figures/digit_domains.png "
                        "(digit_scenes.png with --scenes)")  # fmt: skip
    parser.add_argument("--scenes", action="store_true", help="the digit-scene figure instead")
    parser.add_argument("--gam-curves", nargs="+", metavar="RUN", help="GAM curves of run folders")
    args = parser.parse_args()
    if args.gam_curves:
        gam_curves_figure(args.gam_curves, args.out or "docs/figures/gam_curves.png")
        return
    if args.scenes:
        digit_scenes_figure(args.root, args.out or "docs/figures/digit_scenes.png")
        return
    args.out = args.out or "docs/figures/digit_domains.png"
    domains = {
        "SynDigits (demo source)": SynDigits(200, seed=0),
        "UCIDigits (demo target)": UCIDigits(),
    }
    try:
        domains["MNIST test"] = MNIST(args.root, split="test")
        domains["USPS test"] = USPS(args.root, split="test")
    except FileNotFoundError as missing:
        print(f"skipping MNIST/USPS: {missing}")
    fig, axes = plt.subplots(len(domains), 10, figsize=(7, 0.8 * len(domains) + 0.2))
    for row, (name, dataset) in enumerate(domains.items()):
        for col, image in enumerate(first_of_each_digit(dataset)):
            axes[row, col].imshow(image[0], cmap="gray", vmin=0, vmax=1)
            axes[row, col].set(xticks=[], yticks=[])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
