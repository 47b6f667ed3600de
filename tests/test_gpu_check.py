"""``benchmarks/gpu_check.py --small``: the GPU check's code paths on the CPU, as on the GPU
machine (no jsonargparse, no W&B), every check passing or skipped with its reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

# The GPU machine has neither package: importing them fails and their metadata is absent (Lightning
# reads it before it imports jsonargparse), as there.
RUN_WITHOUT_JSONARGPARSE_AND_WANDB = """
import importlib.metadata as metadata, runpy, sys
HIDDEN = ("jsonargparse", "wandb", "docstring_parser")
for name in HIDDEN:
    sys.modules[name] = None
installed = metadata.version
def version(name):
    if name.lower().replace("-", "_") in HIDDEN:
        raise metadata.PackageNotFoundError(name)
    return installed(name)
metadata.version = version
sys.argv = ["gpu_check", *sys.argv[1:]]
runpy.run_module("benchmarks.gpu_check", run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_check_small_passes_on_the_cpu_without_jsonargparse_and_wandb(tmp_path):
    report = tmp_path / "gpu.md"
    done = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_JSONARGPARSE_AND_WANDB, "--small", "--steps", "1",
         "--out", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ")][2:]
    status = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows}
    assert "FAIL" not in status.values(), report.read_text()
    expected_skips = {"syncs", "ddp_nccl"}  # need CUDA / two GPUs
    assert {name for name, s in status.items() if s == "SKIP"} == expected_skips, status
    assert "CPU timings, not GPU figures" in report.read_text()
