"""One prepared GPU check (issues 18 and 19): the cost of configs/gta.yaml's stages and the
GPU-correctness checks, in one run that any session with a GPU can start.

    python -m benchmarks.gpu_check [--small] [--out FILE] [--steps N] [--only NAME ...] [--budget-s]

Needs torch, torchvision, lightning, torchmetrics and PyYAML only (no jsonargparse, W&B, data or
internet; tests/test_gpu_check.py hides those). On a GPU: ``preflight`` of the GAM settings of
configs/gta.yaml (ERFNet) and configs/gta_deeplabv3.yaml (DeepLabV3-ResNet101), synthetic 512x1024
data, batch 2 + 2, bf16-mixed; predict throughput; SyncBatchNorm with a BatchNorm tap; autocast in
Gaussian matching; bf16-mixed and 16-mixed (GradScaler, two optimisers); syncs per step; 2-process
NCCL with two GPUs. ``--small``: the same code paths on the CPU at 32x64 (CI). A failing check never
stops the others, none starts after ``--budget-s``, each rewrites the report.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from unittest import SkipTest as Skip  # a check that cannot run here: SKIP, with why

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L
import torch
import yaml

from benchmarks.machine import provenance
from benchmarks.segmentation_speed import writer_overlap
from dam_lightning.callbacks import GaussianMatching
from dam_lightning.data import DomainAdaptationDataModule
from dam_lightning.data.synthetic import SyntheticLike
from dam_lightning.matching import foldable_layers, gaussian_match, measure_statistics
from dam_lightning.models import ERFNet, TorchvisionSegmentation
from dam_lightning.modules import GAMAdaptModule
from dam_lightning.trainer import DamTrainer

CLASSES = 19
BN_TAP = "encoder.layers.7.bn2"  # a BatchNorm that sync_batchnorm replaces
WARMUP_STEPS = 3  # stage-1 batches of F_s before the checks that only need some F_s


def shipped_gam(config: str) -> dict:
    """A shipped config's GAM settings but the network and F_s (YAML: no jsonargparse here)."""
    init = yaml.safe_load((Path(__file__).parents[1] / config).read_text())["model"]["init_args"]
    adam = {k: functools.partial(torch.optim.Adam, **v["init_args"])
            for k, v in init.items() if k.endswith("_optimizer")}  # fmt: skip
    return {k: v for k, v in init.items() if k not in ("net", "source_weights")} | adam


GAM, DEEPLAB = shipped_gam("configs/gta.yaml"), shipped_gam("configs/gta_deeplabv3.yaml")


class Context:
    """What the checks share: device, sizes, precision and builders of data, networks, modules."""

    def __init__(self, args, folder: Path):
        self.args, self.folder = args, folder
        self.cuda = torch.cuda.is_available() and not args.small
        self.device, self.size = ("cuda", (512, 1024)) if self.cuda else ("cpu", (32, 64))
        self.steps = args.steps or (2 if args.small else 10)
        self.precision = "bf16-mixed" if self.cuda else "32-true"

    def data(self, length: int = 64) -> DomainAdaptationDataModule:
        shape, like = (3, *self.size), "dam_lightning.data.GTA5"
        return DomainAdaptationDataModule(
            SyntheticLike(like, shape, length), SyntheticLike(like, shape, length, False, seed=1),
            SyntheticLike("dam_lightning.data.Cityscapes", shape, length, seed=2), batch_size=2,
        )  # fmt: skip

    def erfnet(self, num_classes: int = CLASSES) -> ERFNet:
        return ERFNet(num_classes, example_input_shape=(3, *self.size))

    def deeplab(self, num_classes: int = CLASSES) -> TorchvisionSegmentation:
        arch, shape = "deeplabv3_resnet101", (3, *self.size)
        return TorchvisionSegmentation(num_classes, arch, example_input_shape=shape)

    def gam(self, net=None, **overrides) -> GAMAdaptModule:
        settings = GAM | dict(source_steps=WARMUP_STEPS) | overrides
        return GAMAdaptModule(net or self.erfnet, CLASSES, task="segmentation", **settings)

    def trainer(self, callbacks=(), **options) -> DamTrainer:
        settings = dict(accelerator=self.device, devices=1, precision=self.precision) | options
        return DamTrainer(
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            default_root_dir=self.folder, callbacks=list(callbacks), **settings,
        )  # fmt: skip


def preflight(ctx: Context, net, settings: dict) -> str:
    """The library's ``preflight`` of a GAM run with stage 1 and Gaussian matching (layerwise,
    10 calibration batches, as configs/gta.yaml), on synthetic data of the check's size."""
    batches = 10 if ctx.cuda else 2  # --small: the code path, not the cost
    matching = GaussianMatching(calibration_batches=batches, every_n_epochs=0, mode="layerwise")
    trainer = ctx.trainer([matching], max_steps=40000)
    report = trainer.preflight(ctx.gam(net, **settings), ctx.data(), ctx.steps, synthetic=True)
    stages = {s.stage: s for s in report.stages}
    parts = [f"{s.stage} {s.step_seconds * 1000:.1f} ms"
             + (f" / {s.peak_memory_mib:,.0f} MiB" if s.peak_memory_mib else "")
             for s in report.stages]  # fmt: skip
    ratio = stages["gam"].step_seconds / stages["source"].step_seconds
    return f"{'; '.join(parts)}; GAM/source step **{ratio:.2f}x**"


def check_predict(ctx: Context) -> str:
    """``predict`` of ERFNet with 1024x2048 PNGs (segmentation_speed's section d)."""
    images = 2 if ctx.args.small else 8
    times = writer_overlap(argparse.Namespace(device=ctx.device, eval_images=images,
                                              eval_size=ctx.size))  # fmt: skip
    return (f"seconds per image at {ctx.size[0]}x{ctx.size[1]} with 1024x2048 PNGs: inference "
            f"{times['inference']:.3f}, + writer on the main process {times[0]:.3f}, + writer "
            f"threads {times[2]:.3f}")  # fmt: skip


def check_syncs(ctx: Context) -> str:
    """Device-to-host syncs per GAM step: CUDA's sync debug mode warns at each one."""
    if not ctx.cuda:
        raise Skip("CUDA's sync debug mode needs a GPU")
    counts = []

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.record = warnings.catch_warnings(record=True)
            self.caught = self.record.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")
            self.record.__exit__(None, None, None)
            found = [w for w in self.caught if "synchroniz" in str(w.message)]
            counts.append([f"{Path(w.filename).name}:{w.lineno}" for w in found])

    ctx.trainer([Count()], max_steps=WARMUP_STEPS + 2 * 6).fit(ctx.gam(), datamodule=ctx.data())
    steps = counts[WARMUP_STEPS + 1 :]  # after stage 1 and the batch that matches
    return f"syncs per GAM step {[len(c) for c in steps]} at {sorted(set(sum(steps, [])))[:4]}"


def check_mixed(ctx: Context, precision: str) -> str:
    """A few GAM steps at ``precision``: losses finite, F_t and the discriminators change."""
    module, losses, before = ctx.gam(), [], None

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            nonlocal before
            if pl_module.adapting and before is None:
                before = copy.deepcopy(pl_module.state_dict())
            elif before is not None:
                losses.append(float(trainer.callback_metrics["train/loss_g"]))

    trainer = ctx.trainer([Watch()], precision=precision, max_steps=WARMUP_STEPS + 2 * 4)
    trainer.fit(module, datamodule=ctx.data())
    after = module.state_dict()
    moved = {net: any(not torch.equal(before[k], v) for k, v in after.items() if k.startswith(net))
             for net in ("target_net.", "discriminators.")}  # fmt: skip
    assert losses and all(map(torch.isfinite, torch.tensor(losses))), f"loss_g {losses}"
    assert all(moved.values()), f"changed: {moved}"
    return f"{precision}: loss_g {[f'{v:.4g}' for v in losses]}, F_t and D changed"


def check_sync_batchnorm(ctx: Context) -> str:
    """A tap on a BatchNorm that SyncBatchNorm replaces: its discriminator still receives the
    activations (D step: F_s's and F_t's; G step: F_t's)."""
    module = ctx.gam(layers={BN_TAP: 1.0, "output": 1.0})
    seen, discriminator = [], module.discriminators[BN_TAP.replace(".", "__")]
    discriminator.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    options = dict(strategy="ddp", sync_batchnorm=True) if ctx.cuda else {}
    if not ctx.cuda:  # no process group on a CPU: convert as Lightning does, BatchNorm runs
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    try:
        ctx.trainer(max_steps=WARMUP_STEPS + 2 * 2, **options).fit(module, datamodule=ctx.data())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    kind = type(module.target_net.get_submodule(BN_TAP)).__name__
    assert kind == "SyncBatchNorm" and len(seen) == 2 * 3, f"{kind}, {len(seen)} activations"
    return f"{BN_TAP} is a {kind}; its discriminator received {len(seen)} activations"


def check_matching_autocast(ctx: Context) -> str:
    """Under bf16 autocast each matched layer runs in the dtype a plain forward gives it, in
    both engines; one_pass and layerwise agree (fp32 as tightly as the CPU tests ask)."""
    torch.manual_seed(0)
    source_net = ctx.erfnet().to(ctx.device).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, *ctx.size, generator=g).to(ctx.device) for _ in range(2)]
    stats = measure_statistics(source_net, batches, foldable_layers(source_net))
    target = [1.5 * b + 0.5 for b in batches]
    nets, dtypes = {}, {}
    for mode in ("forward", "one_pass", "layerwise"):
        for bf16 in (True, False):
            net, seen = copy.deepcopy(source_net), {}
            for name in stats:
                net.get_submodule(name).register_forward_hook(
                    lambda m, a, out, n=name, s=seen: s.setdefault(n, set()).add(out.dtype)
                )
            with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=bf16):
                if mode == "forward":
                    with torch.no_grad():
                        net(target[0])
                else:
                    gaussian_match(source_net, net, [], target, source_stats=stats, mode=mode)
            nets[mode, bf16], dtypes[mode, bf16] = net, seen
    for mode in ("one_pass", "layerwise"):
        wrong = [k for k in stats if dtypes[mode, True][k] != dtypes["forward", True][k]]
        assert not wrong, f"{mode}: {wrong[:2]} ran in another dtype than a plain forward"
    a, b = nets["one_pass", False].state_dict(), nets["layerwise", False].state_dict()
    differ = [k for k in a if not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5)]
    assert not differ, f"fp32 one_pass != layerwise at {differ[:3]} ({len(differ)} tensors)"
    bf16 = sum(dtypes["forward", True][k] == {torch.bfloat16} for k in stats)
    return (f"{bf16} of {len(stats)} matched layers run bf16 in both engines, as in a plain "
            "forward; fp32 one_pass = layerwise (rtol 1e-4)")  # fmt: skip


def check_ddp_nccl(ctx: Context) -> str:
    if not ctx.cuda or torch.cuda.device_count() < 2:
        raise Skip("needs two GPUs")
    module = ctx.gam(layers={BN_TAP: 1.0, "output": 1.0})
    options = dict(devices=2, strategy="ddp_spawn", sync_batchnorm=True)
    ctx.trainer(max_steps=WARMUP_STEPS + 2 * 3, **options).fit(module, datamodule=ctx.data())
    return "2 processes, NCCL, SyncBatchNorm with a BatchNorm tap: fit finished"


CHECKS = {
    "preflight_erfnet": lambda ctx: preflight(ctx, ctx.erfnet, GAM),
    "preflight_deeplabv3_resnet101": lambda ctx: preflight(ctx, ctx.deeplab, DEEPLAB),
    "predict": check_predict,
    "syncs": check_syncs,
    "bf16_mixed": functools.partial(check_mixed, precision="bf16-mixed"),
    "16_mixed": functools.partial(check_mixed, precision="16-mixed"),
    "matching_autocast": check_matching_autocast,
    "sync_batchnorm": check_sync_batchnorm,  # then ddp: these leave process groups behind
    "ddp_nccl": check_ddp_nccl,
}


def run_check(ctx: Context, fn) -> tuple[str, str]:
    try:
        return "PASS", fn(ctx)
    except Skip as skip:
        return "SKIP", str(skip)
    except Exception as err:  # one check's failure never stops the others
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        return "FAIL", last.replace("|", "\\|").replace("\n", " ")


def write_report(ctx: Context, rows: list, started: float, path: Path) -> None:
    size = f"{ctx.size[0]}x{ctx.size[1]}"
    mode = (f"GPU, {size}, batch 2 + 2, {ctx.precision}" if ctx.cuda else
            f"**CPU, --small {size}: CPU timings, not GPU figures**")  # fmt: skip
    lines = ["# GPU check", "", *provenance("gpu_check", sys.argv[1:]), "",
             f"Mode: {mode}; {ctx.steps} timed steps per stage after 2 warm-up steps; this run "
             f"{time.perf_counter() - started:.0f} s (budget {ctx.args.budget_s:.0f} s).", "",
             "| check | status | seconds | result |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {status} | {sec:.1f} | {text} |" for name, status, sec, text in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU, 32x64: the code paths only")
    parser.add_argument("--out", default="docs/results/gpu.md")
    parser.add_argument("--steps", type=int, help="timed steps per stage (default 10, --small 2)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), metavar="NAME")
    parser.add_argument("--budget-s", type=float, default=480.0)
    args = parser.parse_args(argv)
    started, failed = time.perf_counter(), 0
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available).*")
    with tempfile.TemporaryDirectory() as folder:
        ctx, rows = Context(args, Path(folder)), []
        for name in args.only or list(CHECKS):
            start = time.perf_counter()
            if start - started > args.budget_s:
                status, text = "SKIP", f"budget: {start - started:.0f} s > --budget-s"
            else:
                status, text = run_check(ctx, CHECKS[name])
            failed += status == "FAIL"
            rows.append((name, status, time.perf_counter() - start, text))
            print(f"{status} {name} ({rows[-1][2]:.1f} s): {text}", flush=True)
            write_report(ctx, rows, started, Path(args.out))
    print(f"report: {args.out} ({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
