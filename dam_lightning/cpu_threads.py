"""How many threads a CPU run gives PyTorch, chosen from what the machine has free.

PyTorch's intra-op threads wait for each other at every parallel region: when one of them is
descheduled by another busy process, every operation stalls. Measured on the 2-core machine
(segmentation demo, source training): 12.4 it/s with 2 threads on a quiet machine, 0.30 beside
one busy process; with 1 thread 8.6 and 7.9 (issue 22). So a run takes the cores that were idle
when it started, shared among its processes, and at least one thread each.
"""

from __future__ import annotations

import os
import time

import torch


def threads_for(cores: int, busy_cores: float, processes: int, default: int) -> int:
    """Threads per process: the cores not busy with other work, shared among ``processes``,
    at most ``default`` (PyTorch's own choice) and at least 1.

    Example:
        >>> threads_for(cores=2, busy_cores=0.1, processes=1, default=2)  # quiet machine
        2
        >>> threads_for(cores=2, busy_cores=1.0, processes=1, default=2)  # one busy process
        1
        >>> threads_for(cores=16, busy_cores=0.0, processes=4, default=16)  # 4 CPU processes
        4
    """
    free = cores - round(busy_cores)
    return max(1, min(default, free // max(processes, 1)))


def busy_cores(seconds: float = 0.2) -> float | None:
    """How many cores other processes kept busy over ``seconds`` (this one sleeps meanwhile),
    from /proc/stat; None where there is no /proc/stat."""
    try:
        first = _cpu_times()
        time.sleep(seconds)
        second = _cpu_times()
    except OSError:
        return None
    total = sum(second) - sum(first)
    idle = (second[3] + second[4]) - (first[3] + first[4])  # idle + iowait
    return 0.0 if total <= 0 else (total - idle) / total * (os.cpu_count() or 1)


def _cpu_times() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:9]]


def choose_cpu_threads(processes: int) -> str | None:
    """Set PyTorch's thread count for a CPU run of ``processes`` processes on this machine;
    returns the line that says what was chosen and why. ``OMP_NUM_THREADS`` set by the user
    wins (nothing is changed)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"CPU threads: {torch.get_num_threads()} per process (OMP_NUM_THREADS)"
    busy = busy_cores()
    if busy is None:
        return None
    cores = os.cpu_count() or 1
    threads = threads_for(cores, busy, processes, torch.get_num_threads())
    torch.set_num_threads(threads)
    return (
        f"CPU threads: {threads} per process ({cores} cores, {busy:.1f} busy with other work "
        f"at the start, {processes} process{'es' if processes > 1 else ''}; set "
        "OMP_NUM_THREADS to choose)"
    )
