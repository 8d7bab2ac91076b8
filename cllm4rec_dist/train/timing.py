"""Where the wall time of a run goes: seconds per named phase, summed over repeats, with counts.

The Ray driver, rank 0 of the workers and the single-process trainer each keep one ``PhaseTimer``;
rank 0 writes its phases to ``<run>/timing.json`` and the driver adds its own (Ray start, worker
start, export) to the same file, so that one file holds the split of the whole job.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

from cllm4rec_dist.atomic import write_json_atomic

TIMING_FILE = "timing.json"


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.marks: dict[str, float] = {}  # wall-clock timestamps (time.time()) of named moments

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks[name] = time.time() if at is None else at

    def as_dict(self) -> dict:
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "counts": dict(self.counts),
                "marks": dict(self.marks)}


def write_timing(run_dir: str, section: str, timer: PhaseTimer) -> None:
    """Add ``timer`` as ``section`` of <run>/timing.json (read-modify-replace: one writer at a time)."""
    write_json_atomic(os.path.join(run_dir, TIMING_FILE), read_timing(run_dir) | {section: timer.as_dict()})


def read_timing(run_dir: str) -> dict:
    path = os.path.join(run_dir, TIMING_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def process_started_at() -> float | None:
    """Wall-clock time this process started (Linux /proc), so that interpreter start and imports count too."""
    try:
        with open("/proc/self/stat", encoding="utf-8") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="utf-8") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
