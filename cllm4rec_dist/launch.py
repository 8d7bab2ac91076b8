"""What the launchers share: parse the config, run, export (the demo dataset: corpus/preprocess.py ``demo_dataset``).

`launchers/pretrain_llama.py` (Ray) and `launchers/finetune.py` (DeepSpeed launcher or Ray)
are thin wrappers around this module.

Interruption (`interruptible`, used by the launchers and `cllm4rec train`): Ctrl-C (SIGINT) and SIGTERM stop a run
the same way. The training unwinds as from a KeyboardInterrupt (Ray's workers are aborted and its local cluster
stopped, the run folder's lock released), and the command ends with one line on stderr naming the run folder and
the command that resumes it, with exit status 130 for SIGINT and 143 for SIGTERM (128 + the signal's number, as a
shell reports a process the signal killed): no traceback. A second signal during that cleanup ends the process
at once, with the same line and status.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading

from cllm4rec_dist.atomic import write_json_atomic
from cllm4rec_dist.config import TrainConfig, add_config_arguments, config_from_args
from cllm4rec_dist.quiet import quiet_libraries
from cllm4rec_dist.resources import packaged, resolve_path
from cllm4rec_dist.train.run_folder import locked_run_dirs
from cllm4rec_dist.train.timing import TIMING_FILE, PhaseTimer, read_timing, write_timing

DEFAULT_CONFIG = packaged(os.path.join("configs", "demo.yaml"))


def parse(description: str, argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description)
    add_config_arguments(p)
    p.add_argument("--no-export", action="store_true", help="skip the embedding export at the end")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = p.parse_args(argv)
    args.config = resolve_path(args.config) if args.config else DEFAULT_CONFIG
    quiet_libraries()
    return config_from_args(args), args


def finish(cfg: TrainConfig, args: argparse.Namespace, result: dict, timer: PhaseTimer | None = None) -> int:
    """After training: export the best tables with original ids into <run>/export, print the summary and
    where the wall time went (``<run>/timing.json``)."""
    timer = timer or PhaseTimer()
    if not args.no_export:
        from cllm4rec_dist.export_run import export_checkpoint

        result["export"] = os.path.join(cfg.out, "export")
        with timer.phase("export"):  # the data this job trained on: the checkpoint's path may be an old place of it
            export_checkpoint(cfg.out, result["export"], data_dir=cfg.data)
    timer.mark("finished")
    write_timing(cfg.out, "driver", timer)
    timing = read_timing(cfg.out)
    split = wall_time_split(timing)
    write_json_atomic(os.path.join(cfg.out, TIMING_FILE), timing | {"wall_time": split})
    keep = {k: result[k] for k in ("valid", "test", "best", "stages", "stopped", "global_step", "seconds", "export")
            if k in result}
    for key, value in keep.items():
        print(f"[result] {key}: {json.dumps(value, default=str)}", flush=True)
    print(f"[result] wall time: {wall_time_line(timing)} (split in {cfg.out}/timing.json)", flush=True)
    return 0


WORKER_PHASES = ("worker_imports", "init_distributed", "data", "backbone_load", "engines", "resume", "train_steps",
                 "log_reduce", "validation", "checkpoints", "test")
"""Rank 0's phases (timing.json "rank0") that the wall-time split names, in the order a run goes through them."""


def wall_time_split(timing: dict) -> dict[str, float]:
    """Seconds per phase of a whole job from timing.json's "driver" and "rank0" sections, in order, and their
    "total": from the start of the process the user started (``process_started``: the boot clock's reading of it,
    train/timing.py ``process_started_at``) to the ``finished`` mark. "other" is what no phase covers (Ray's
    reporting, the driver's own checks), so the parts add up to the total exactly."""
    driver, rank0 = timing.get("driver", {}), timing.get("rank0", {})
    seconds, marks = driver.get("seconds", {}), driver.get("marks", {})
    worker, worker_marks = rank0.get("seconds", {}), rank0.get("marks", {})
    split = {}
    if marks.get("process_started") and "started" in marks:
        split["python_start_imports"] = marks["started"] - marks["process_started"]
    for key in ("driver_imports", "demo_data", "checks", "ray_start"):
        if key in seconds:
            split[key] = seconds[key]
    if "fit_started" in marks and "worker_started" in worker_marks:
        split["worker_start"] = worker_marks["worker_started"] - marks["fit_started"]
    for key in WORKER_PHASES:
        split[key] = worker.get(key, 0.0)
    if "fit_finished" in marks and "train_finished" in worker_marks:
        split["workers_stop"] = marks["fit_finished"] - worker_marks["train_finished"]
    for key in ("ray_stop", "export"):
        split[key] = seconds.get(key, 0.0)
    first = marks.get("process_started") or marks.get("started")
    if first and "finished" in marks:
        split["total"] = marks["finished"] - first
        split["other"] = split["total"] - sum(v for k, v in split.items() if k != "total")
    return {k: round(v, 2) for k, v in split.items()}


def wall_time_line(timing: dict) -> str:
    split = wall_time_split(timing)
    counts = {**timing.get("rank0", {}).get("counts", {})}
    parts = [f"{k.replace('_', ' ')} {v:.1f}s" + (f" ({counts[k]}x)" if counts.get(k, 1) > 1 else "")
             for k, v in split.items() if k != "total" and abs(v) >= 0.05]
    share = (f" ({100 * split['train_steps'] / split['total']:.0f}% in train steps)"
             if split.get("total", 0) > 0 and "train_steps" in split else "")
    return f"{split.get('total', 0):.1f}s{share} = " + ", ".join(parts)


def exit_now(status: int) -> None:
    """End a command's process with ``status`` once it has returned; after a success, without the interpreter's
    teardown.

    By then everything the run writes is complete and closed (files are written atomically, TensorBoard's writer
    is closed, the run folder's lock is released, a local Ray is shut down); what is left is finalising torch,
    Ray and the other loaded modules: 0.9-6 s after the last line on a 2-core machine (measured; more under
    load), which no timing line can show. The console's buffers and logging's handlers are flushed first. A
    failure or an interruption exits the ordinary way (its cleanup may still have work to do)."""
    if status != 0:
        sys.exit(status)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing left to write to
            pass
    os._exit(0)


INTERRUPT_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""Exit status of a command stopped by a signal: 128 + its number, as a shell reports a process the signal killed;
distinct from a failure (1) and a user error (2)."""


def resume_command(command: list[str], run_dir: str) -> list[str]:
    """``command`` (the words as typed) made to continue the run in ``run_dir``: its --out (added when the run
    folder was the default runs/<time>), and no `--resume false`."""
    words, has_out, i = [], False, 0
    resume_off = False
    while i < len(command):
        word = command[i]
        if word == "--resume" and i + 1 < len(command):
            resume_off = command[i + 1].strip().lower() in ("false", "0", "no", "off")
            i += 2
            continue
        if word.startswith("--resume="):
            resume_off = word.split("=", 1)[1].strip().lower() in ("false", "0", "no", "off")
            i += 1
            continue
        has_out = has_out or word == "--out" or word.startswith("--out=")
        words.append(word)
        i += 1
    return words + ([] if has_out else ["--out", run_dir]) + (["--resume", "true"] if resume_off else [])


def newest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint in a run folder (<run>/checkpoints, or Ray's <run>/ray, or <run>/ray/<name>
    as runs wrote it before), or None."""
    try:
        from cllm4rec_dist.train.checkpoint import LocalSink

        local = LocalSink(run_dir).latest()
        if local:
            return local
        ray_dir = os.path.join(run_dir, "ray")
        folders = [ray_dir] + [os.path.join(ray_dir, name) for name in os.listdir(ray_dir)
                               if os.path.isdir(os.path.join(ray_dir, name))]
        found = sorted((c, os.path.join(folder, c)) for folder in folders for c in os.listdir(folder)
                       if c.startswith("checkpoint_"))
        return found[-1][1] if found else None
    except (OSError, ImportError):
        return None


def interrupted_line(signum: int, command: list[str], run_dir: str | None, look: bool = True) -> str:
    """The one line an interrupted command ends with: which signal, the run folder, how to resume it."""
    name = signal.Signals(signum).name
    if run_dir is None:
        return f"interrupted ({name}) before the run took its run folder: nothing to resume."
    checkpoint = newest_checkpoint(run_dir) if look else None
    start = (f"from {os.path.relpath(checkpoint, run_dir)}" if checkpoint
             else "from its newest checkpoint (none in the run folder yet)" if look else "from its newest checkpoint")
    return (f"interrupted ({name}): the run in {run_dir} stopped; resume it {start} with: "
            f"{shlex.join(resume_command(command, run_dir))}")


class _Interruption:
    """The signals `interruptible` received, and the one line it prints for them."""

    def __init__(self, command: list[str]):
        self.command = command
        self.first_lock = len(locked_run_dirs())
        self.signals: list[int] = []
        self.reported = False

    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            raise KeyboardInterrupt  # Ray's ray.get re-raises this one (any other exception becomes its own)
        # A second one while the first one's cleanup runs: leave now (a stale lock is taken over by the next run).
        os._exit(self.report(look=False))

    def run_dir(self) -> str | None:
        mine = locked_run_dirs()[self.first_lock:]
        return mine[-1] if mine else None

    def report(self, look: bool = True) -> int:
        signum = self.signals[0] if self.signals else signal.SIGINT
        if not self.reported:
            self.reported = True
            sys.stdout.flush()
            print(interrupted_line(signum, self.command, self.run_dir(), look), file=sys.stderr, flush=True)
        return INTERRUPT_EXIT[signum]


def interruptible(fn, *args, command: list[str]) -> int:
    """``fn(*args)``, a command's whole run, ended by Ctrl-C or SIGTERM as the module doc says; ``command``: the
    words that started it (for the resume line)."""
    state = _Interruption(command)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, state.on_signal) for signum in INTERRUPT_EXIT}
    try:
        return fn(*args)
    except KeyboardInterrupt:
        return state.report()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
