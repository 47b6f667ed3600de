"""What the library is, its three stages, its commands and its shipped configs: the text of the
top-level ``--help``. Imports neither torch nor Lightning, so that ``python -m dam_lightning
--help`` answers at once (``__main__``) and ``dam_lightning.cli`` prints the same text.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

PROG = "python -m dam_lightning"

DESCRIPTION = (
    "dam_lightning: unsupervised domain adaptation by deep activation matching (GAM), on "
    "PyTorch Lightning. A network trained on a labelled source domain is adapted to an "
    "unlabelled target domain in three stages:"
)

WORKFLOW = (
    "1. source training: F_s learns the labelled source data (configs/*_source.yaml, or the "
    "first source_steps batches of a GAM run);",
    "2. Gaussian matching: F_t, a copy of F_s, gets the mean and std of F_s's activations, "
    "layer by layer, without training (the GaussianMatching callback);",
    "3. GAM: one discriminator per matched layer tells F_s's activations on source images from "
    "F_t's on target images; F_t learns to fool them while a weight drift keeps it near F_s.",
)

SUBCOMMANDS = {
    "fit": "Train: stage 1 with a *_source.yaml config, stages 2 and 3 (or all three) with a "
    "GAM config.",
    "validate": "Score a checkpoint on the validation sets: prints the scores in percent, writes "
    "metrics.json (fractions, as summary.json).",
    "test": "Score a checkpoint on the test set: prints the scores in percent, writes metrics.json "
    "(fractions).",
    "predict": "Write a checkpoint's predictions (a CSV for digits, PNGs for segmentation).",
    "diagnose": "Measure, for every candidate layer of the source network, how far source and "
    "target activations are apart, before and after Gaussian matching (a diagnostic: it does "
    "not choose the layers to match).",
    "preflight": "Run a few steps of every stage of the config on this machine and print, per "
    "stage, seconds per step, peak memory and the bottleneck, and the estimated time of the "
    "whole run; writes preflight.json.",
}
"""What each command does, for the top-level help and each command's own ``--help``
(``dam_lightning.cli`` passes them on; a test checks both list the same commands)."""

_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
_HELP_FLAGS = ("-h", "--help")


def wants_top_level_help(args: list[str]) -> bool:
    """Whether the command line asks for the top-level help: nothing, or only ``-h``/``--help``
    (``fit --help`` is the command's own, answered by the full parser)."""
    return not args or (len(args) == 1 and args[0] in _HELP_FLAGS)


def top_level_help(width: int = 100) -> str:
    """The top-level ``--help``: what the library is, its workflow, its commands, the configs
    it ships and where to read on."""
    indent = " " * 14
    lines = [f"usage: {PROG} {{{','.join(SUBCOMMANDS)}}} --config FILE [options]", ""]
    lines += _wrap(DESCRIPTION, width)
    for step in WORKFLOW:
        lines += _wrap(step, width, initial_indent="  ", subsequent_indent="     ")
    lines += ["", "commands:"]
    for name, text in SUBCOMMANDS.items():
        lines += _wrap(text, width, initial_indent=f"  {name:<11} ", subsequent_indent=indent)
    configs = shipped_configs()
    if configs:
        lines += ["", "shipped configs (configs/; an overlay goes after another --config):"]
        for name, text in configs.items():
            lines += _wrap(text, width, initial_indent=f"  {name:<27} ", subsequent_indent=" " * 30)
    lines += [
        "",
        "examples:",
        f"  {PROG} fit --config configs/demo.yaml     # the offline demo, all three stages",
        f"  {PROG} fit --help                         # every option of a command",
        f"  {PROG} validate --config configs/demo.yaml --ckpt_path "
        "runs/demo/<date>_<time>/checkpoints/last.ckpt",
        "",
        "Read on: README.md, docs/configuration.md, docs/datasets.md, docs/errors.md.",
    ]
    return "\n".join(lines)


def _wrap(text: str, width: int, **kwargs) -> list[str]:
    # file and class names (SYNTHIA-RAND-CITYSCAPES, scikit-learn) are not cut at their hyphens
    return textwrap.wrap(text, width, break_on_hyphens=False, **kwargs)


def shipped_configs() -> dict[str, str]:
    """``{file name: the first sentence of its header comment}`` for ``configs/*.yaml`` (empty
    where the package is installed without the repository's configs)."""
    return {path.name: _first_sentence(path) for path in sorted(_CONFIGS.glob("*.yaml"))}


def _first_sentence(path: Path, longest: int = 160) -> str:
    """The first sentence of a config's header comment, without its remarks in brackets (the
    help lists what a config is for; the file says how), at most ``longest`` characters, cut
    after a clause."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header)
    while re.search(r" ?\([^()]*\)", text):
        text = re.sub(r" ?\([^()]*\)", "", text)
    found = re.match(r"(.+?\.)(\s+(?=[A-Z])|$)", text)  # not "Fig. 6"
    sentence = (found.group(1) if found else text).rstrip(".")
    if len(sentence) > longest:
        sentence = sentence[:longest].rsplit(", ", 1)[0]
    return sentence + "."
