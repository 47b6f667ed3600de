"""Wall time of the diagnosis engine (``dam_lightning.diagnosis``) against its targets: LeNet on
MNIST -> USPS under 30 s, ERFNet at a small demo resolution under 2 minutes, on this CPU.

    python -m benchmarks.diagnose_speed [--threads 1] [--rounds 3] [--digits-root PATH]
        [--source-steps 300] [--calibration-batches 10] [--erfnet-size 64x64]
        [--erfnet-batch 4] [--output DIR] [--report PATH]

(a) LeNet on MNIST -> USPS (test splits), trained for --source-steps by a plain loop (the time
    does not depend on how well), --calibration-batches of 128 per domain, every foldable layer.
(b) The segmentation demo's ERFNet (width 0.5, 11 classes) on its DigitScenes at 64x64, random
    weights, batches of 16. (c) ERFNet (19 classes, width 1), random weights, synthetic scenes
    at --erfnet-size, batches of --erfnet-batch.

Each: the median over --rounds of ``diagnose`` and of ``Diagnosis.save``, beside one forward
pass over one domain's calibration batches. --output keeps the last round's files.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import parse_size, provenance
from dam_lightning.data import (
    MNIST,
    USPS,
    DigitScenes,
    DomainAdaptationDataModule,
    SynDigits,
    UCIDigits,
)
from dam_lightning.diagnosis import diagnose, diagnose_datamodule
from dam_lightning.models import ERFNet, LeNet
from dam_lightning.runs import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
TARGETS_S = {"lenet": 30.0, "seg_demo": 120.0, "erfnet": 120.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed diagnoses per network")
    parser.add_argument("--digits-root", default=str(REPO.parent / "shared" / "data" / "digits"))
    parser.add_argument("--source-steps", type=int, default=300, help="LeNet training steps")
    parser.add_argument("--calibration-batches", type=int, default=10, help="per domain")
    parser.add_argument("--erfnet-size", type=parse_size, default=(64, 64), help="HxW")
    parser.add_argument("--erfnet-batch", type=int, default=4, help="images per batch")
    parser.add_argument("--output", help="keep the last round's files in OUTPUT/{lenet,erfnet}")
    parser.add_argument("--report", help="also write the figures as Markdown to this file")
    return parser.parse_args(argv)


def trained_lenet(data: DomainAdaptationDataModule, steps: int) -> tuple[LeNet, float]:
    """LeNet after ``steps`` batches of a plain supervised loop on the source (Adam 1e-3)."""
    torch.manual_seed(0)
    net = LeNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for x, y in itertools.islice(itertools.cycle(data.source_dataloader()), steps):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval(), time.perf_counter() - start


def street_batches(args, seed: int, domain_shift: bool) -> list[torch.Tensor]:
    """Piecewise-constant 'scenes': random class maps at 1/8 resolution, upsampled, each class a
    colour, plus noise; the target domain is darker, lower in contrast and tinted."""
    g = torch.Generator().manual_seed(seed)
    height, width = args.erfnet_size
    palette = torch.rand(19, 3, generator=g) * 2 - 1
    batches = []
    for _ in range(args.calibration_batches):
        classes = torch.randint(0, 19, (args.erfnet_batch, height // 8, width // 8), generator=g)
        classes = torch.nn.functional.interpolate(classes[:, None].float(), scale_factor=8)
        images = palette[classes[:, 0].long()].permute(0, 3, 1, 2)
        images = images + 0.2 * torch.randn(images.shape, generator=g)
        if domain_shift:
            images = 0.6 * images - 0.3 + torch.tensor([0.2, 0.0, -0.2]).view(1, 3, 1, 1)
        batches.append(images)
    return batches


def forward_seconds(net, batches) -> float:
    with torch.no_grad():
        net(batches[0])  # warm-up
        start = time.perf_counter()
        for x in batches:
            net(x)
    return time.perf_counter() - start


def timed(run, rounds: int, output: Path | None):
    """Median seconds of ``run()`` (the diagnosis) and of saving it, over ``rounds``."""
    diagnose_s, save_s = [], []
    for round_index in range(rounds):
        start = time.perf_counter()
        diagnosis = run()
        diagnose_s.append(time.perf_counter() - start)
        last = round_index == rounds - 1
        with tempfile.TemporaryDirectory() as scratch:
            folder = output if (last and output is not None) else Path(scratch)
            start = time.perf_counter()
            diagnosis.save(folder)
            save_s.append(time.perf_counter() - start)
    return diagnosis, statistics.median(diagnose_s), statistics.median(save_s)


def main(argv=None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output) if args.output else None
    rows, notes = [], []

    mnist, usps = MNIST(args.digits_root, split="test"), USPS(args.digits_root, split="test")
    data = DomainAdaptationDataModule(mnist, usps, batch_size=128, seed=0)
    lenet, train_s = trained_lenet(data, args.source_steps)
    source = data.calibration_batches("source", args.calibration_batches)
    diagnosis, diagnose_s, save_s = timed(
        lambda: diagnose_datamodule(lenet, data, args.calibration_batches, progress=False),
        args.rounds,
        output / "lenet" if output else None,
    )
    rows.append(("LeNet, MNIST -> USPS", diagnosis, diagnose_s, save_s,
                 forward_seconds(lenet, source), "lenet"))  # fmt: skip
    notes.append(
        f"LeNet trained for {args.source_steps} steps on the MNIST test images ({train_s:.0f} s, "
        "not timed); LeNet A-distance after Gaussian matching: "
        + ", ".join(f"{row.name}: {row.a_distance_after:.2f}" for row in diagnosis.layers)
    )

    scenes = DomainAdaptationDataModule(
        DigitScenes(SynDigits(2000, seed=0), 400, split="all", appearance="render", seed=0),
        DigitScenes(UCIDigits(), 400, split="adapt", appearance="camera", seed=0),
        batch_size=16,
        seed=0,
    )
    torch.manual_seed(0)
    demo_net = ERFNet(11, width=0.5, dropout=0.0, example_input_shape=(3, 64, 64)).eval()
    diagnosis, diagnose_s, save_s = timed(
        lambda: diagnose_datamodule(demo_net, scenes, args.calibration_batches, progress=False),
        args.rounds,
        output / "seg_demo" if output else None,
    )
    demo_forward_s = forward_seconds(
        demo_net, scenes.calibration_batches("source", args.calibration_batches)
    )
    name = "ERFNet (11 classes, width 0.5), DigitScenes 64x64 (seg_demo)"
    rows.append((name, diagnosis, diagnose_s, save_s, demo_forward_s, "seg_demo"))

    torch.manual_seed(0)
    height, width = args.erfnet_size
    erfnet = ERFNet(19, example_input_shape=(3, height, width)).eval()
    source, target = street_batches(args, 0, False), street_batches(args, 1, True)
    diagnosis, diagnose_s, save_s = timed(
        lambda: diagnose(erfnet, source, target, progress=False),
        args.rounds,
        output / "erfnet" if output else None,
    )
    rows.append((f"ERFNet (19 classes, width 1), {height}x{width}", diagnosis, diagnose_s, save_s,
                 forward_seconds(erfnet, source), "erfnet"))  # fmt: skip

    lines = [
        "| network | layers | images per domain | diagnose (s) | save (s) | total (s) "
        "| target (s) | one forward pass (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d, diagnose_s, save_s, forward_s, key in rows:
        lines.append(
            f"| {name} | {len(d.layers)} | {d.settings['source_images']} | {diagnose_s:.2f} "
            f"| {save_s:.2f} | {diagnose_s + save_s:.2f} | {TARGETS_S[key]:.0f} | {forward_s:.3f} |"
        )
    table = "\n".join(lines)
    report = "\n".join(
        [
            "# Diagnosis speed",
            "",
            *provenance(
                "diagnose_speed",
                sys.argv[1:] if argv is None else argv,
                f"; shared with other jobs: load average {load_before:.1f} at the start, "
                f"{os.getloadavg()[0]:.1f} at the end",
            ),
            "",
            f"Median of {args.rounds} rounds. `diagnose`: four passes over the calibration "
            "batches (F_s on source, F_s on target, Gaussian matching of a copy, the copy on "
            "target; each with hooks on every layer at once) and two logistic-regression fits "
            "per layer; `save`: diagnose.md, diagnose.json, gap_by_layer.png, histograms.png. "
            "One forward pass: the network over one domain's calibration batches.",
            "",
            table,
            "",
            *(f"- {note}" for note in notes),
            "- ERFNet rows: random weights (the timing depends on the layers, channels and image "
            "size, not on the weights). seg_demo: the DigitScenes domains of configs/seg_demo.yaml "
            "(400 scenes each, of which the calibration subset is read). Width 1: synthetic scenes "
            "(piecewise-constant class colours plus noise; the target darker, lower in contrast, "
            "tinted).",
            "",
        ]
    )
    print(report)
    if args.report:
        atomic_write_text(args.report, report)


if __name__ == "__main__":
    main()
