"""A process's resident memory, for the scale benchmark and the memory tests: the current RSS
and the peak since the last `reset_peak` (Linux: /proc/self/status's VmRSS and VmHWM; writing
5 to /proc/self/clear_refs resets VmHWM to the current RSS)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak() -> int:
    return _status("VmHWM")


@dataclass
class Phase:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_before: int = 0
    peak: int = 0

    @property
    def extra(self) -> int:
        """Peak RSS above the RSS at the phase's start, in bytes."""
        return self.peak - self.rss_before

    def as_dict(self) -> Dict[str, float]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "rss_before": self.rss_before, "peak": self.peak}


@contextmanager
def measured() -> Iterator[Phase]:
    """Wall and CPU seconds (this process), RSS at the start and peak RSS of the block."""
    phase = Phase(rss_before=rss())
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    yield phase
    phase.wall_s, phase.cpu_s = time.perf_counter() - t0, time.process_time() - c0
    phase.peak = peak()
