"""What machine a benchmark ran on, for the line printed beside its figures."""

from __future__ import annotations

import os
import platform
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
