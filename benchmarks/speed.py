"""Speed of dam_lightning against the plain-PyTorch floor.

    python -m benchmarks.speed [--iterations 60] [--rounds 5] [--demo] [--report PATH]

(a) Framework overhead: a GAMAdaptModule iteration through the Trainer over a plain-PyTorch
    loop doing identical work, measured in alternating rounds (ratio of median iteration times).
(b) Gaussian matching of LeNet in forward passes of F_t over the calibration batches.
(c) With --demo: wall time of the README's demo command.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.machine import describe, provenance
from dam_lightning.data import DomainAdaptationDataModule, SynDigits, UCIDigits
from dam_lightning.matching import (
    GANLoss,
    foldable_layers,
    gaussian_match,
    measure_statistics,
    weight_drift,
)
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule
from dam_lightning.runs import atomic_write_text

LAYERS = {"fc3": 0.1, "fc4": 1.0}


class IterationTimer(L.Callback):
    """Times from one batch start to the next: the whole per-iteration cost of the loop."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def lightning_round(module, data, iterations: int) -> list[float]:
    timer = IterationTimer()
    # max_steps: a new Trainer counts from 0 while the module keeps training
    trainer = L.Trainer(accelerator="cpu", max_steps=2 * iterations, max_epochs=-1,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])  # fmt: skip
    trainer.fit(module, data)
    gaps = [b - a for a, b in itertools.pairwise(timer.starts)]
    return gaps[5:]  # steady state: skip the loop's first iterations


def plain_round(nets, data, iterations: int) -> list[float]:
    """The same work as GAMAdaptModule.training_step, written as a bare loop."""
    source_net, target_net, discriminators, opt_d, opt_t = nets
    gan = GANLoss("vanilla")
    source_iter = itertools.cycle(data.source_dataloader())
    target_iter = itertools.cycle(data.target_dataloader())
    times = []
    for _ in range(iterations + 5):
        times.append(time.perf_counter())
        x_s, _ = next(source_iter)
        x_t = next(target_iter)
        with torch.no_grad():
            a_s = taps(source_net, x_s)
        a_t = taps(target_net, x_t)
        loss_d = sum(
            w * gan.discriminator_loss(d(a_s[n]), d(a_t[n].detach()))
            for n, w in LAYERS.items()
            for d in [discriminators[n]]
        )
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        for p in discriminators.parameters():
            p.requires_grad_(False)
        loss_g = sum(w * gan.generator_loss(discriminators[n](a_t[n])) for n, w in LAYERS.items())
        loss_g = loss_g + weight_drift(target_net, source_net)
        opt_t.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_t.step()
        for p in discriminators.parameters():
            p.requires_grad_(True)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return gaps[5:]


def taps(net: LeNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    fc3 = net.fc3(net.conv2(net.conv1(x)))
    return {"fc3": fc3, "fc4": net.fc4(fc3)}


def framework_overhead(iterations: int, rounds: int) -> dict:
    torch.manual_seed(0)
    data = DomainAdaptationDataModule(SynDigits(4000, seed=0), UCIDigits(), batch_size=128)
    plain_source, plain_target = LeNet(10), LeNet(10)
    plain_target.load_state_dict(plain_source.state_dict())
    folder = tempfile.TemporaryDirectory()  # read by the first fit: both loops share F_s
    torch.save(plain_source.state_dict(), weights := os.path.join(folder.name, "source.pt"))
    module = GAMAdaptModule(LeNet, num_classes=10, layers=LAYERS, source_weights=weights)
    plain_source.requires_grad_(False).eval()
    discriminators = copy.deepcopy(module.discriminators)
    adam = dict(lr=2e-4, betas=(0.5, 0.999))
    optimizers = [torch.optim.Adam(n.parameters(), **adam) for n in (discriminators, plain_target)]
    nets = (plain_source, plain_target, discriminators, *optimizers)
    lightning_times, plain_times = [], []
    for _ in range(rounds):
        lightning_times += lightning_round(module, data, iterations)
        plain_times += plain_round(nets, data, iterations)
    folder.cleanup()
    lightning_ms = 1000 * statistics.median(lightning_times)
    plain_ms = 1000 * statistics.median(plain_times)
    return {"lightning_ms": lightning_ms, "plain_ms": plain_ms, "ratio": lightning_ms / plain_ms}


def gaussian_matching_cost(repeats: int, batches: int = 10) -> dict:
    """Each repeat times one forward pass of F_t over the calibration batches, then one matching
    per mode on a fresh copy of F_t (the copy is made outside the timing); the cost is the
    median over repeats of matching time / that repeat's forward time, so that a noisy moment
    on a shared machine hits numerator and denominator alike."""
    torch.manual_seed(0)
    source_net, target_net = LeNet(10).eval(), LeNet(10).eval()
    source = SynDigits(128 * batches, seed=0).images.split(128)
    target = UCIDigits().images[: 128 * batches].split(128)
    layers = foldable_layers(target_net)
    stats = measure_statistics(source_net, source, layers)

    def forward_pass():
        with torch.no_grad():
            for x in target:
                target_net(x)

    def match(mode):
        net = copy.deepcopy(target_net)
        return lambda: gaussian_match(source_net, net, [], target, source_stats=stats, mode=mode)

    forward_pass(), match("one_pass")(), match("layerwise")()  # warm-up: pools, allocator
    forwards, ratios = [], {"one_pass": [], "layerwise": []}
    for _ in range(repeats):
        forward = _seconds(forward_pass)
        forwards.append(forward)
        for mode, values in ratios.items():
            values.append(_seconds(match(mode)) / forward)
    return {
        "forward_ms": 1000 * statistics.median(forwards),
        **{mode: statistics.median(values) for mode, values in ratios.items()},
        "layers": len(layers),
        "repeats": repeats,
    }


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def demo_wall_time() -> float:
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "WANDB_MODE": "offline"}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dam_lightning", "fit", "--config", "configs/demo.yaml",
         "--trainer.enable_progress_bar=false"],
        cwd=repo, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=60, help="per round and loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--demo", action="store_true", help="also time the README demo")
    parser.add_argument("--report", help="also write the figures as Markdown to this file")
    args = parser.parse_args()
    print(f"Machine: {describe()}", flush=True)
    overhead = framework_overhead(args.iterations, args.rounds)
    cost = gaussian_matching_cost(repeats=15)
    lines = [
        f"(a) GAM iteration: Lightning {overhead['lightning_ms']:.1f} ms, plain PyTorch "
        f"{overhead['plain_ms']:.1f} ms -> overhead {overhead['ratio']:.3f}x (median of "
        f"{args.rounds} x {args.iterations} iterations, batch 128 + 128, CPU)",
        f"(b) Gaussian matching, LeNet, {cost['layers']} layers, 10 calibration batches of 128: "
        f"one_pass {cost['one_pass']:.2f} forward passes, layerwise {cost['layerwise']:.2f} "
        f"(one forward pass = {cost['forward_ms']:.1f} ms; median of {cost['repeats']} paired "
        "repeats)",
    ]
    lines += [f"(c) demo wall time: {demo_wall_time():.0f} s"] if args.demo else []
    print("\n".join(lines))
    if args.report:
        text = [
            "# Speed", "", *provenance("speed", sys.argv[1:], f"; {time.strftime('%Y-%m-%d')}."),
            "", "Targets (issue 3): framework overhead <= 1.10x the plain-PyTorch loop; "
            "Gaussian matching <= 1.5 forward passes.", "", *[f"- {line}" for line in lines], "",
        ]  # fmt: skip
        atomic_write_text(args.report, "\n".join(text))


if __name__ == "__main__":
    main()
