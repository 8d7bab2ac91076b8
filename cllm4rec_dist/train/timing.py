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


def _start_ticks(stat: str) -> int:
    """Field 22 of a /proc/<pid>/stat line: the process's start, in clock ticks after boot (the command name, field
    2, is in parentheses and may hold spaces, so the fields are counted after its closing one)."""
    return int(stat.rsplit(")", 1)[1].split()[19])


def _parent_pid(stat: str) -> int:
    return int(stat.rsplit(")", 1)[1].split()[1])


def started_at(stat: str, boottime_now: float, wall_now: float, ticks_per_s: int) -> float:
    """Wall-clock time (``time.time()`` scale) at which the process of the /proc ``stat`` line started.

    The start in /proc is in ticks of the boot clock (CLOCK_BOOTTIME): the process's age is the boot clock now
    minus that, and its start is the wall clock now minus its age. /proc/stat's ``btime`` (the wall-clock time
    of boot) is NOT used: it is whole seconds, and on a VM restored from a snapshot or after the wall clock is
    stepped it is off by minutes (a timing line once put 145 s on "python start").
    """
    return wall_now - (boottime_now - _start_ticks(stat) / ticks_per_s)


def _read_stat(pid: int | str) -> str:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        return f.read()


def process_started_at(pid: int | str = "self") -> float | None:
    """Wall-clock time at which process ``pid`` (default: this one) started, so that interpreter start and
    imports count too; None where /proc is not there (not Linux)."""
    try:
        stat = _read_stat(pid)
        boottime_now, wall_now = time.clock_gettime(time.CLOCK_BOOTTIME), time.time()
        return started_at(stat, boottime_now, wall_now, os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


EXEC_IDLE_S = 10.0
"""Wall time between a process's start and a launcher's first statement that its CPU time leaves unexplained,
beyond which the process was another program first (``launch_started_at``)."""


def launch_started_at(first_statement: float, cpu_at_first_statement: float, idle_s: float = EXEC_IDLE_S) -> float:
    """When a launcher's job started, for its wall time: the process's start (``process_started_at``: the
    interpreter's start and the launcher's imports count), unless the process was another program first. A shell
    runs the last command of its command line in its own process (``bash -c "bash scripts/setup.sh && python
    launchers/pretrain_llama.py"`` becomes python once setup ends), and the process's start is then the shell's.
    Starting Python and importing a launcher's first lines is CPU work; a gap between the process's start and the
    launcher's first statement (``time.time()`` and ``time.process_time()`` there) that the CPU time leaves more than
    ``idle_s`` unexplained was a wait before the exec, and the clock starts at the first statement instead."""
    started = process_started_at()
    if started is None or (first_statement - started) - cpu_at_first_statement > idle_s:
        return first_statement
    return started


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [w.decode("utf-8", "replace") for w in f.read().split(b"\0") if w]


def _names_launcher(word: str, launcher_word: str) -> bool:
    """Whether a command-line word is the launcher's program (``.../bin/deepspeed``) or one of its modules
    (``-m deepspeed.launcher.runner``, ``deepspeed.launcher.launch``), not just any word that mentions it."""
    return os.path.basename(word) == launcher_word or word.startswith(f"{launcher_word}.launcher")


def job_started_at(launcher_word: str = "deepspeed") -> float | None:
    """When the command the user typed started: this process's start, or, for a rank that a launcher started
    (``deepspeed`` runs its runner, which runs launch.py, which runs the ranks), the start of its oldest ancestor
    whose command line names ``launcher_word`` (the stopwatch around ``deepspeed ...`` starts there)."""
    try:
        pid, oldest = os.getpid(), None
        while True:
            parent = _parent_pid(_read_stat(pid))
            if parent <= 1 or not any(_names_launcher(w, launcher_word) for w in _cmdline(parent)):
                break
            pid = oldest = parent
        return process_started_at(oldest if oldest is not None else "self")
    except (OSError, ValueError, IndexError):
        return process_started_at()
