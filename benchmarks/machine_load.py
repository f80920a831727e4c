"""How busy the machine is: CPU jiffies from /proc/stat, other processes' share of the
CPU, and the CPU's name (for benchmark tables that must be measured on a quiet machine)."""

from __future__ import annotations

import platform
import time
from pathlib import Path


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def others_share(seconds: float = 3.0) -> float:
    """Fraction of the machine's CPU that processes took over ``seconds`` (us idle)."""
    b0, t0 = busy_jiffies()
    time.sleep(seconds)
    b1, t1 = busy_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
