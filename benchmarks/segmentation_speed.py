"""Speed and memory of the segmentation pieces on ERFNet (19 classes, width 1), with synthetic
tensors: no data set, no checkpoint, no download.

    python -m benchmarks.segmentation_speed [--device cpu|cuda] [--threads N]
        [--batches 4 8] [--batch-size 2] [--size 256x512] [--eval-size 512x1024]
        [--eval-images 4] [--report PATH]

(a) Gaussian matching (every foldable layer, batchnorm="fold"), one_pass and layerwise, for each
    --batches: time in forward passes of F_t over the same batches, and peak memory above what
    was resident before (VmHWM on the CPU, max_memory_allocated on CUDA), each in a fresh process.
(b) Evaluation as Cityscapes is scored (SegmentationTask): forward at --eval-size, upsampling to
    the 1024x2048 label, confusion-matrix update: images/s.
(d) (only with --sections d) ``predict`` through the Trainer with PredictionWriter: (b)'s
    forward + upsampling + softmax/max, then the labelId, colour and overlay PNGs at 1024x2048, for
    --eval-images images: images/s with the PNGs written on the main process (workers=0) and by
    the writer's threads (workers=2), and without a writer.
(e) (only with --sections e) A labelled GTA5 item (a synthetic 1914x1052 PNG pair, resized to
    --eval-size) against decoding its two files with PIL, in this process: ms and the ratio.

Sizes are H x W (calibration default: 256x512 on the CPU, 512x1024 on CUDA). Only --report is
written.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

from benchmarks.machine import describe, parse_size, provenance
from dam_lightning.data.labels import CITYSCAPES_CLASSES, DatasetInfo
from dam_lightning.matching import ActivationTaps, foldable_layers, gaussian_match
from dam_lightning.matching.statistics import measure_statistics
from dam_lightning.models import ERFNet
from dam_lightning.modules.task import SegmentationTask
from dam_lightning.runs import atomic_write_text

NUM_CLASSES = 19
LABEL_SIZE = (1024, 2048)  # Cityscapes' gtFine, (H, W)
IGNORE_INDEX = 255
RUNS = ("forward", "one_pass", "layerwise")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8], help="(a) per run")
    parser.add_argument("--batch-size", type=int, default=2, help="images per calibration batch")
    parser.add_argument("--size", type=parse_size, help="(a) calibration HxW")
    parser.add_argument("--eval-size", type=parse_size, default=(512, 1024), help="network HxW")
    parser.add_argument("--eval-images", type=int, default=4, help="timed, after one warm-up")
    parser.add_argument(
        "--sections", nargs="+", default=["a", "b"], choices=["a", "b", "d", "e"]
    )
    parser.add_argument("--report", help="also write the figures as Markdown to this file")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # the subprocess's job
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = (512, 1024) if args.device == "cuda" else (256, 512)
    return args


def synthetic_batches(args, count: int, seed: int, shift: float = 0.0) -> list[torch.Tensor]:
    """``count`` normalised-RGB-like batches; ``shift`` makes a different domain."""
    g = torch.Generator().manual_seed(seed)
    shape = (args.batch_size, 3, *args.size)
    return [
        ((1 + shift) * torch.randn(shape, generator=g) + shift).to(args.device)
        for _ in range(count)
    ]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def forward_pass(net: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """One forward pass of ``net`` over the calibration batches, as measure_statistics runs it."""
    with torch.no_grad():
        for x in batches:
            net(x)


# (a) Gaussian matching: the parent prepares files, each run is a fresh subprocess.


def prepare_matching(args, workdir: Path) -> dict:
    """Save F_s's weights and its source statistics on source batches for the subprocesses;
    return the number of matched layers and the largest matched layer's output for one
    calibration batch (what one_pass holds per paused batch, at least)."""
    torch.manual_seed(0)
    source_net = ERFNet(NUM_CLASSES).to(args.device).eval()
    layers = foldable_layers(source_net)
    stats = measure_statistics(source_net, synthetic_batches(args, 2, seed=0), layers)
    torch.save(source_net.state_dict(), workdir / "source_net.pt")
    torch.save(stats, workdir / "source_stats.pt")
    with torch.no_grad():
        acts = ActivationTaps(source_net, layers)(synthetic_batches(args, 1, seed=0)[0])
    name, largest = max(acts.items(), key=lambda item: item[1].numel())
    return {"layers": len(layers), "largest": name, "largest_mib": _mib(largest)}


def _mib(t: torch.Tensor) -> float:
    return t.numel() * t.element_size() / 2**20


def measure_run(args) -> dict:
    """In a fresh process: load everything, then time one ``args.run`` and take its peak memory
    above what was resident before it; then time the unit, one forward pass (median of 3)."""
    workdir = Path(args.workdir)
    source_net = ERFNet(NUM_CLASSES, weights=str(workdir / "source_net.pt")).to(args.device)
    source_net.eval()
    target_net = copy.deepcopy(source_net)
    stats = torch.load(workdir / "source_stats.pt", weights_only=False)
    target = synthetic_batches(args, args.batches[0], seed=1, shift=0.5)
    baseline = _memory_baseline(args.device)
    with torch.no_grad():  # one image: the kernels' first-call set-up, under any run's peak
        target_net(target[0][:1])
    if args.run == "forward":
        seconds = _seconds(lambda: forward_pass(target_net, target), args.device)
    else:
        seconds = _seconds(
            lambda: gaussian_match(
                source_net, target_net, [], target, source_stats=stats, mode=args.run
            ),
            args.device,
        )
    peak = _memory_peak(args.device) - baseline
    unit = statistics.median(
        _seconds(lambda: forward_pass(target_net, target), args.device) for _ in range(3)
    )
    return {"seconds": seconds, "forward_seconds": unit, "peak_mib": peak / 2**20}


def _memory_baseline(device: str) -> int:
    """Bytes in use now, with the peak counter reset: allocated CUDA memory, or the resident
    set. Not ``ru_maxrss``: Linux carries it across exec, so a subprocess would start at its
    parent's peak. Writing 5 to /proc/self/clear_refs resets the peak resident set (VmHWM)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        raise RuntimeError(
            f"peak CPU memory needs Linux's /proc/self/clear_refs ({err}); use --device cuda"
        ) from err
    return _proc_status_bytes("VmRSS")


def _memory_peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def run_in_subprocess(args, run: str, batches: int, workdir: Path) -> dict:
    """``measure_run`` for ``run`` on ``batches`` calibration batches in a fresh process."""
    command = [
        sys.executable, "-m", "benchmarks.segmentation_speed", "--run", run,
        "--workdir", str(workdir), "--device", args.device, "--batches", str(batches),
        "--batch-size", str(args.batch_size),
        "--size", size_text(args.size),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"the {run!r} measurement failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "passes": result["seconds"] / result["forward_seconds"]}


def gaussian_matching_cost(args) -> dict:
    """For each calibration-set size in ``args.batches``: seconds, forward-pass units and peak
    memory of each run in RUNS."""
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        network = prepare_matching(args, workdir)
        runs = {
            (batches, run): run_in_subprocess(args, run, batches, workdir)
            for batches in args.batches
            for run in RUNS
        }
    return {**network, "runs": runs}


# (b) Evaluation throughput.


def evaluation_throughput(args) -> dict:
    """Images/s of forward + upsample to the label + argmax + confusion-matrix update, one
    image per step, after one warm-up image; with the time split at the logits."""
    torch.manual_seed(0)
    net = ERFNet(NUM_CLASSES).to(args.device).eval()
    task = SegmentationTask(NUM_CLASSES, CITYSCAPES_CLASSES)
    metrics = task.metrics().to(args.device)
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, *args.eval_size, generator=g).to(args.device)
    label = torch.randint(0, NUM_CLASSES, (1, *LABEL_SIZE), generator=g)
    label[:, :64] = IGNORE_INDEX  # some ignored pixels, as in every Cityscapes label
    label = label.to(args.device)
    forward_times, scoring_times = [], []
    with torch.inference_mode():
        for _ in range(args.eval_images + 1):
            _synchronize(args.device)
            start = time.perf_counter()
            logits = net(image)
            _synchronize(args.device)
            middle = time.perf_counter()
            # the task's scoring of those logits: upsampled to the label, argmax, update
            metrics.update(task.predict(torch.nn.Identity(), logits, task.label_size(label)), label)
            _synchronize(args.device)
            forward_times.append(middle - start)
            scoring_times.append(time.perf_counter() - middle)
    forward_times, scoring_times = forward_times[1:], scoring_times[1:]  # after the warm-up
    total = [f + s for f, s in zip(forward_times, scoring_times, strict=True)]
    return {
        "images_per_s": 1 / statistics.median(total),
        "forward_s": statistics.median(forward_times),
        "scoring_s": statistics.median(scoring_times),
    }


# (d) predict with the PredictionWriter: writing overlapped with inference or not.


class _ScenePaths(Dataset):
    """``count`` items ``(image, index)`` at the network's size, each with ``image_path`` to one
    synthetic 1024x2048 RGB PNG (for the overlay)."""

    info = DatasetInfo("segmentation", NUM_CLASSES, CITYSCAPES_CLASSES)

    def __init__(self, count: int, size: tuple[int, int], image_file: str):
        self.count, self.size, self.image_file = count, size, image_file

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return torch.randn(3, *self.size, generator=torch.Generator().manual_seed(index)), index

    def image_path(self, index: int) -> str:
        return self.image_file


class _PredictAtLabelSize(L.LightningModule):
    """``EvaluatingModule.predict_step`` at 1024x2048: forward, bilinear upsampling, softmax,
    max."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = ERFNet(NUM_CLASSES).eval()
        self.task = SegmentationTask(NUM_CLASSES, CITYSCAPES_CLASSES)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        images, _ = batch
        probabilities = self.task.predict(self.net, images, LABEL_SIZE).softmax(dim=1)
        confidence, prediction = probabilities.max(dim=1)
        return {"prediction": prediction, "confidence": confidence, "label": None}


def writer_overlap(args) -> dict:
    """Seconds per image of ``predict`` with workers=0 and workers=2 (after one warm-up image),
    and of writing alone (``workers=0`` less a run without writer)."""
    from PIL import Image

    from dam_lightning.callbacks import PredictionWriter

    class Timer(L.Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
            if batch_idx == 0:
                self.start = time.perf_counter()  # after the warm-up image

    def per_image(writer) -> float:
        timer = Timer()
        trainer = L.Trainer(
            accelerator=args.device, devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[timer] + ([writer] if writer else []),
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(dataset, batch_size=1)
        trainer.predict(module, loader, return_predictions=False)  # ends after every write
        return (time.perf_counter() - timer.start) / args.eval_images

    with tempfile.TemporaryDirectory() as folder:
        rgb = torch.randint(0, 256, (*LABEL_SIZE, 3), generator=torch.Generator().manual_seed(3))
        image_file = str(Path(folder) / "image.png")
        Image.fromarray(rgb.to(torch.uint8).numpy()).save(image_file)
        dataset = _ScenePaths(args.eval_images + 1, args.eval_size, image_file)
        module = _PredictAtLabelSize()
        inference = per_image(None)
        times = {"inference": inference}
        for workers in (0, 2):
            out = str(Path(folder) / f"workers-{workers}")
            times[workers] = per_image(PredictionWriter(out, workers=workers))
    return times


def writer_lines(args, times: dict) -> list[str]:
    return [
        f"(d) predict with PredictionWriter: (b)'s work at {size_text(args.eval_size)} + three "
        f"PNGs at {size_text(LABEL_SIZE)} per image ({args.device}, {args.eval_images} images "
        f"after one warm-up): {times['inference']:.2f} s per image without writer; writing on "
        f"the main process {times[0]:.2f} s ({1 / times[0]:.2f} images/s), in 2 writer threads "
        f"{times[2]:.2f} s ({1 / times[2]:.2f} images/s)"
    ]


# (e) the loader: one labelled GTA5 item against the bare decode of its two files.


def loader_item_cost(args, repeats: int = 15) -> list[str]:
    import numpy as np
    from PIL import Image

    from dam_lightning.data import GTA5
    from dam_lightning.data.transforms import SegmentationTransform

    with tempfile.TemporaryDirectory() as folder:
        root, rng = Path(folder), np.random.default_rng(0)
        rows, cols = np.mgrid[0:1052, 0:1914]  # a smooth scene with noise, blocky classes
        rgb = np.stack([cols * 255 // 1914, rows * 255 // 1052, (cols + rows) % 256], -1)
        rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
        label = Image.fromarray(((cols // 97 + rows // 61) % 34).astype(np.uint8), "P")
        label.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tolist())
        for sub, picture in (("images", Image.fromarray(rgb)), ("labels", label)):
            (root / sub).mkdir()
            picture.save(root / sub / "00001.png")
        dataset = GTA5(root, transform=SegmentationTransform(size=args.eval_size))

        def bare() -> None:
            for path in (dataset.images[0], dataset.labels[0]):
                with Image.open(path) as picture:
                    np.asarray(picture)

        # alternated, so that both meet the same load; best of each
        pairs = [(_seconds(bare, "cpu"), _seconds(lambda: dataset[0], "cpu"))
                 for _ in range(repeats)]  # fmt: skip
        decode, item = (1000 * min(column) for column in zip(*pairs, strict=True))
        dtype = dataset[0][1].dtype
    return [
        f"(e) Loader: a labelled GTA5 item (1914x1052 PNG pair -> {size_text(args.eval_size)}, "
        f"label {dtype}) {item:.1f} ms against {decode:.1f} ms to decode its two files with PIL "
        f"({item / decode:.2f}x; best of {repeats}, {torch.get_num_threads()} threads)"
    ]


# The report.


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def matching_lines(args, cost: dict) -> list[str]:
    """Section (a): a sentence, then a Markdown table with one row per run."""
    memory = "peak resident set (VmHWM)" if args.device == "cpu" else "max_memory_allocated"
    lines = [
        f"(a) Gaussian matching of ERFNet (19 classes, width 1): {cost['layers']} matched layers "
        f"(every BatchNorm and conv, batchnorm=fold), calibration batches of {args.batch_size} "
        f"images at {size_text(args.size)} (H x W, {args.device}). Cost in forward passes of "
        f"F_t over the same batches; peak memory = {memory} during the run less the memory in "
        "use before it, in a fresh process. Largest matched activation: "
        f"{cost['largest']}, {cost['largest_mib']:.0f} MiB per batch.",
        "",
        "| calibration | run | time (s) | forward passes | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for (batches, run), result in cost["runs"].items():
        passes = "1 (the unit)" if run == "forward" else f"{result['passes']:.2f}"
        lines.append(
            f"| {batches} x {args.batch_size} images | {run} | {result['seconds']:.1f} | "
            f"{passes} | {result['peak_mib']:.0f} |"
        )
    return lines


def evaluation_lines(args, throughput: dict) -> list[str]:
    label = size_text(LABEL_SIZE)
    return [
        f"(b) Evaluation: ERFNet forward at {size_text(args.eval_size)} + bilinear "
        f"upsampling to the {label} label + argmax + SegmentationMetrics update, "
        f"one image per step ({args.device}): {throughput['images_per_s']:.2f} images/s "
        f"(forward {throughput['forward_s']:.2f} s + scoring {throughput['scoring_s']:.2f} s "
        f"per image; median of {args.eval_images})"
    ]


def write_report(path: Path, lines: list[str], argv: list[str]) -> None:
    """The figures as Markdown, headed by the command and the machine, written atomically."""
    text = "\n".join(
        [
            "# Segmentation speed",
            "",
            *provenance(
                "segmentation_speed",
                argv,
                f". Run on {time.strftime('%Y-%m-%d')}; synthetic tensors, random weights.",
            ),
            "",
            *lines,
            "",
        ]
    )
    atomic_write_text(str(path), text)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        print(json.dumps(measure_run(args)))
        return
    print(f"Machine: {describe()}", flush=True)
    lines: list[str] = []
    sections = {
        "a": lambda: matching_lines(args, gaussian_matching_cost(args)),
        "b": lambda: evaluation_lines(args, evaluation_throughput(args)),
        "d": lambda: writer_lines(args, writer_overlap(args)),
        "e": lambda: loader_item_cost(args),
    }
    for key in args.sections:
        section = sections[key]()
        print("\n".join(section), flush=True)
        lines += ([""] if lines else []) + section
    if args.report:
        write_report(Path(args.report), lines, argv)


if __name__ == "__main__":
    main()
