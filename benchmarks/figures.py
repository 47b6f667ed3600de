"""Figures for the docs: sample images of each digit domain.

    python benchmarks/figures.py [--root ../shared/data/digits]

Writes docs/figures/digit_domains.png: one row per domain (SynDigits, UCIDigits, and MNIST and
USPS test images when --root holds them), digits 0-9 from left to right.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dam_lightning.data import MNIST, USPS, SynDigits, UCIDigits  # noqa: E402


def first_of_each_digit(dataset) -> list:
    images = {}
    for image, label in (dataset[i] for i in range(len(dataset))):
        images.setdefault(int(label), image)
        if len(images) == 10:
            break
    return [images[d] for d in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/digits")
    parser.add_argument("--out", default="docs/figures/digit_domains.png")
    args = parser.parse_args()
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
            ax = axes[row, col]
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
