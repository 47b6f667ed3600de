"""What a speed benchmark prints beside its figures: the machine, and the command that made them."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
from pathlib import Path

import lightning as L
import torch


def describe() -> str:
    """CPU model, cores, torch threads, accelerator and library versions, on one line."""
    cpu, info = platform.machine(), Path("/proc/cpuinfo")
    models = [line for line in info.read_text().splitlines() if line.startswith("model name")]
    cpu = models[0].split(":", 1)[1].strip() if models else cpu
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}"
    )


def provenance(script: str, arguments: list[str], details: str = "") -> list[str]:
    """The Markdown lines a report opens with: the command (``python -m benchmarks.<script>``
    with ``arguments``, quoted to paste), then the machine, continued by ``details``."""
    command = shlex.join(["python", "-m", f"benchmarks.{script}", *arguments])
    return ["Produced by:", "", f"    {command}", "", f"Machine: {describe()}{details}"]


def parse_size(text: str) -> tuple[int, int]:
    """``"256x512"`` -> (256, 512), (H, W)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW, e.g. 256x512") from None
    return height, width
