"""What both benchmark scripts report about the machine they ran on.

Timings on a shared 2-core machine are only meaningful when nothing else ran, so each
script prints the environment (BLAS library, threads, OpenBLAS settings) and how much
CPU time other processes took during each measurement.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_info


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux
        return float("nan")


class OtherLoad:
    """CPU time that other processes used while this one ran (Linux /proc/stat).

    Timings on a shared machine are only meaningful when this stays near zero.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:3]) + sum(fields[5:8])) / hz  # user nice system irq softirq steal
        mine = os.times()
        return (
            time.monotonic(),
            busy,
            mine.user + mine.system + mine.children_user + mine.children_system,
        )

    def share(self):
        """Other processes' CPU use since start, as a share of all CPUs' time (None: unknown)."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = (end[0] - self.start[0]) * (os.cpu_count() or 1)
        if wall < 1.0:  # /proc/stat counts in clock ticks: too coarse for shorter spans
            return None
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return min(1.0, max(0.0, other / wall))


def percent(share) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def describe_environment(extra_lines=()) -> str:
    """Python, NumPy, CPUs and load; each BLAS/OpenMP pool; ``extra_lines``; OpenBLAS settings."""
    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load_average():.2f}"
    ]
    for pool in threadpool_info():
        lines.append(
            f"{pool.get('internal_api')} {pool.get('version')} "
            f"({pool.get('architecture')}, {pool.get('filepath', '').rsplit('/', 1)[-1]}), "
            f"{pool.get('num_threads')} threads"
        )
    lines += list(extra_lines)
    for name in (
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
    ):
        lines.append(f"{name}={os.environ.get(name, '(unset)')}")
    return "\n".join(lines)
