"""Which target digits does adaptation get wrong? Per-class accuracy of GAM (full) on digits.

    python benchmarks/confusion.py --root ../shared/data/digits

On USPS->MNIST the accuracy of GAM (full) swings from run to run far more than the paper's
±0.5. This runs the GAM (full) row of reproduce_digits on seeds 10-15 (10 and 11 are the
ablation's; none are the tables' seeds) from source networks trained for 2,000 iterations (the
tables' schedule) and for 10,000 (the paper's), and scores the *validation half* of the target
(gaussian_ablation's fixed random half), per class: the source network's accuracy, the adapted
network's, its worst class and the largest confusions. The confusion matrix of the worst run is
printed in full. Each source network is adapted ``--adaptation-seeds`` times (different
seeds), to tell a failure that follows the source network from one the adaptation's own
randomness causes. ``--source-augment [shrink|enlarge]`` trains the source networks with
``dam_lightning.data.RandomAffine`` (not in the paper), the fix measured in
docs/results/confusion_affine.md.

Each run uses one thread and ``--workers`` runs go in parallel; source networks are shared with
gaussian_ablation (benchmarks/.cache/weights/sourceN/) and trained when absent. Results are
cached per run, so an interrupted call resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts
import gaussian_ablation as A  # noqa: E402
import reproduce_digits as R  # noqa: E402
from machine import command_line, provenance  # noqa: E402

from dam_lightning.models import LeNet  # noqa: E402
from dam_lightning.modules.task import ClassificationTask  # noqa: E402


@torch.no_grad()
def confusion_matrix(net: torch.nn.Module, data, num_classes: int = 10) -> torch.Tensor:
    """Counts ``[true, predicted]`` of ``net`` (in eval mode) on ``data`` (torchmetrics), from
    the predictions the task scores everywhere else (``ClassificationTask.predict``)."""
    net.eval()
    task = ClassificationTask(num_classes)
    counts = MulticlassConfusionMatrix(num_classes, validate_args=False)
    for x, y in DataLoader(data, batch_size=1000):
        counts.update(task.predict(net, x).argmax(dim=1), y)
    return counts.compute()


def class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Per true class: the share (%) of its images predicted as that class."""
    return (100 * confusion.diag() / confusion.sum(dim=1).clamp(min=1)).tolist()


def accuracy(confusion: torch.Tensor) -> float:
    return 100 * confusion.diag().sum().item() / confusion.sum().item()


def largest_confusions(confusion: torch.Tensor, count: int = 2) -> list[tuple[int, int, float]]:
    """The ``count`` largest (true, predicted, % of the true class) off the diagonal."""
    shares = 100 * confusion / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    shares.fill_diagonal_(0)
    values, flat = shares.flatten().topk(count)
    n = confusion.shape[0]
    return [(int(i) // n, int(i) % n, float(v)) for v, i in zip(values, flat, strict=True)]


def run_one(job: dict) -> dict:
    """One GAM (full) run on one thread: confusion matrices of F_s and of the adapted F_t on
    the validation half."""
    torch.set_num_threads(1)
    source, target = R.load_domains(job["direction"], job["root"], job["protocol"])
    weights = A.source_network(job, source, target)
    validation, _ = A.validation_halves(target)
    network = LeNet(num_classes=10)
    network.load_state_dict(torch.load(weights))
    start = time.perf_counter()
    module = R.adapt_module(
        R.ADAPTATION_ROWS["GAM (full)"], source, target, job["adapt_seed"], job["iterations"],
        weights,
    )  # fmt: skip
    return {
        "source_only": confusion_matrix(network, validation).tolist(),
        "adapted": confusion_matrix(module.target_net.cpu(), validation).tolist(),
        "seconds": time.perf_counter() - start,
    }


ADAPT_SEED_STEP = 1000  # adaptation seeds of source network s: s, s + 1000, s + 2000, ...


def run_key(job: dict) -> str:
    key = f"{job['direction']}/{job['seed']}/{job['iterations']}/source{job['source_iterations']}"
    key += f"/{job['augment']}" if job["augment"] else ""
    return key if job["adapt_seed"] == job["seed"] else f"{key}/adapt{job['adapt_seed']}"


def plan(args, protocol: str) -> list[dict]:
    return [
        dict(root=args.root, protocol=protocol, workdir=args.workdir, direction=args.direction,
             seed=seed, adapt_seed=seed + ADAPT_SEED_STEP * k, iterations=args.iterations,
             source_iterations=source_iterations, augment=args.source_augment)
        for source_iterations in args.source_iterations
        for seed in args.seeds
        for k in range(args.adaptation_seeds)
    ]  # fmt: skip


def write_report(args, protocol: str, jobs: list[dict], cache: dict, command: str) -> str:
    minutes = sum(cache[run_key(j)]["seconds"] for j in jobs if run_key(j) in cache) / 60
    lines = [
        f"# Per-class accuracy of GAM (full) on {args.direction}",
        "",
        *provenance(
            command,
            f"; each run on one thread, {args.workers} runs in parallel. "
            f"Compute: {minutes:.0f} min of adaptation time (summed over the runs).",
        ),
        "",
        f"Protocol: {protocol}. GAM (full) as in the digits tables (discriminators on fc3 and "
        f"fc4, weight drift, no Gaussian matching), {args.iterations} adaptation iterations. "
        "Accuracy (%) on the validation half of the target images (gaussian_ablation's; "
        f"permutation seed {A.VALIDATION_PERMUTATION_SEED}). Source networks of seeds "
        f"{args.seeds}, each adapted {args.adaptation_seeds} time(s) (adaptation seed s, "
        f"s + {ADAPT_SEED_STEP}, ...). The largest confusions are 'true -> predicted: % of the "
        "true class'.",
        "",
        "| source iterations | seed: source network / adaptation | source only | GAM (full) | "
        "worst class after GAM | "
        "largest confusions after GAM |",
        "|---|---|---|---|---|---|",
    ]
    worst_run = None
    for source_iterations in args.source_iterations:
        chosen = [j for j in jobs if j["source_iterations"] == source_iterations]
        group = [(j, cache[run_key(j)]) for j in chosen if run_key(j) in cache]
        for job, run in group:
            before, after = torch.tensor(run["source_only"]), torch.tensor(run["adapted"])
            per_class = class_accuracy(after)
            worst = min(range(len(per_class)), key=per_class.__getitem__)
            confusions = ", ".join(f"{t} -> {p}: {s:.0f}" for t, p, s in largest_confusions(after))
            lines.append(
                f"| {_schedule(args, source_iterations)} | {job['seed']} / {job['adapt_seed']} | "
                f"{accuracy(before):.1f} | "
                f"{accuracy(after):.1f} | {worst}: {per_class[worst]:.1f} | {confusions} |"
            )
            if worst_run is None or accuracy(after) < accuracy(worst_run[1]):
                worst_run = (job, after)
        if len(group) > 1:
            lines.append(_mean_row(_schedule(args, source_iterations), [r for _, r in group]))
    if worst_run is not None:
        job, after = worst_run
        lines += [
            "",
            f"Confusion matrix of the lowest run (source {job['source_iterations']} iterations, "
            f"seeds {job['seed']} / {job['adapt_seed']}); rows: true digit, columns: predicted "
            "digit:",
            "",
            "| true \\ predicted | " + " | ".join(str(c) for c in range(10)) + " |",
            "|---|" + "---|" * 10,
        ]
        for true, row in enumerate(after.tolist()):
            lines.append(f"| {true} | " + " | ".join(str(v) for v in row) + " |")
    lines.append("")
    text = "\n".join(lines)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    return text


def _schedule(args, source_iterations: int) -> str:
    """How the source networks were trained, for the report's first column."""
    if args.source_augment is None:
        return str(source_iterations)
    return f"{source_iterations} + {args.source_augment} (RandomAffine)"


def _mean_row(source_iterations: str, runs: list[dict]) -> str:
    """Means over seeds, and how many runs left some class below half right."""
    before = [accuracy(torch.tensor(r["source_only"])) for r in runs]
    after = [accuracy(torch.tensor(r["adapted"])) for r in runs]
    collapsed = sum(min(class_accuracy(torch.tensor(r["adapted"]))) < 50 for r in runs)
    return (
        f"| {source_iterations} | **mean of {len(runs)}** | {sum(before) / len(runs):.1f} | "
        f"**{sum(after) / len(runs):.1f}** | {collapsed} of {len(runs)} runs below 50% | |"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/digits")
    parser.add_argument("--direction", default="USPS->MNIST", choices=list(R.PAPER_TABLE1))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14, 15])
    parser.add_argument("--source-iterations", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument(
        "--source-augment",
        nargs="?",
        const="shrink",
        choices=list(R.SOURCE_AUGMENTATIONS),
        help="train the source networks with dam_lightning.data.RandomAffine (not in the "
        "paper): 'shrink' (the default when no name is given) or 'enlarge' the source digits, "
        "see reproduce_digits.SOURCE_AUGMENTATIONS",
    )
    parser.add_argument(
        "--adaptation-seeds",
        type=int,
        default=2,
        help="adaptation runs per source network: seeds s, s+1000, ... (does a failure follow "
        "the source network or the adaptation's own randomness?)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", default="docs/results/confusion.md")
    parser.add_argument("--cache", default="benchmarks/.cache/confusion.json")
    parser.add_argument("--workdir", default="benchmarks/.cache/weights")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    protocol = R.detect_protocol(args.root)
    cache_path = Path(args.cache)
    cache = A.load_cache(cache_path)
    jobs = plan(args, protocol)
    todo = [j for j in jobs if run_key(j) not in cache]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for batch in A.source_networks_first(todo):
            for job, result in zip(batch, pool.map(run_one, batch), strict=True):
                cache[run_key(job)] = result
                A.save_cache(cache_path, cache)
                adapted = accuracy(torch.tensor(result["adapted"]))
                print(f"{run_key(job)}: {adapted:.2f}", flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = command_line("confusion.py", given)
    print(write_report(args, protocol, jobs, cache, command))


if __name__ == "__main__":
    main()
