"""What a benchmark prints beside its figures: the machine it ran on, the command that made them."""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path

import lightning as L
import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def describe() -> str:
    """CPU, cores, torch threads, accelerator and library versions, on one line."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"{device}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {L.__version__}"
    )


def command_line(script: str, arguments: list[str]) -> str:
    """The shell command that reruns ``benchmarks/<script>`` with ``arguments``, quoted so that
    it can be pasted (directions such as USPS->MNIST and names with spaces included)."""
    return shlex.join(["python", f"benchmarks/{script}", *(a for a in arguments if a)])


def provenance(command: str, details: str = "") -> list[str]:
    """The Markdown lines a report opens with: the command that produced it, then the machine
    (``details`` continues the machine's sentence, e.g. how the runs shared it)."""
    return ["Produced by:", "", f"    {command}", "", f"Machine: {describe()}{details}"]


def report_and_cache(args, name: str) -> Path:
    """Fill in ``args.report`` (default ``docs/results/<name>.md``) and return the cache file
    (``args.cache``, default ``benchmarks/.cache/<name>.json``) of a benchmark whose report
    and cache are named after its part."""
    args.report = args.report or f"docs/results/{name}.md"
    return Path(args.cache or f"benchmarks/.cache/{name}.json")
