"""Trust (issue 32), the launch/signals part of the trust test matrix, through the real commands: a run folder is
never world-writable (Ray's logs included), a local Ray cluster is the machine's size and a job that needs more is
refused before anything starts, and Ctrl-C / SIGTERM end `cllm4rec train` and the Ray launcher with one line naming
the run folder and the command that resumes it (exit status 130 / 143), no traceback, the run folder's lock
released."""

from __future__ import annotations

import os
import runpy
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllm4rec_dist import distributed
from cllm4rec_dist.config import ConfigError
from cllm4rec_dist.errors import run_command
from cllm4rec_dist.launch import newest_checkpoint
from cllm4rec_dist.train.run_folder import LOCK_FILE, RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ablation", "cf", "--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "1",
        "--schedule.finetune_epochs", "1",
        "--schedule.finetune_content_fraction", "0", "--batch.max_length", "64", "--log_every", "1000"]
LONG = [*TINY, "--schedule.pretrain_epochs", "500", "--log_every", "1"]  # minutes of steps: stopped by a signal


def world_writable(root: Path) -> list[str]:
    return [str(p) for p in [root, *root.rglob("*")] if p.lstat().st_mode & stat.S_IWOTH]


def test_ray_logs_are_copied_private_to_the_user(tmp_path, monkeypatch):
    """Ray's session folder is world-writable (0777): its copy in RUN/logs/ray is not, whatever the umask."""
    import ray

    source = tmp_path / "session" / "logs"
    (source / "events").mkdir(parents=True)
    (source / "old").mkdir()
    for path, text in ((source / "raylet.out", "raylet"), (source / "events" / "event_GCS.log", "gcs"),
                       (source / "old" / "rotated.log", "old"), (source / "raylet.sock", "")):
        path.write_text(text)
    for path in [source, *source.rglob("*")]:
        path.chmod(0o777)
    destination = tmp_path / "run" / "logs" / "ray"

    class Node:
        def get_logs_dir_path(self):
            return str(source)

    monkeypatch.setattr(ray._private.worker, "_global_node", Node())
    umask = os.umask(0)
    try:
        distributed.copy_ray_logs(str(destination))
    finally:
        os.umask(umask)
    assert (destination / "raylet.out").read_text() == "raylet"
    assert (destination / "events" / "event_GCS.log").read_text() == "gcs"
    assert not (destination / "old").exists() and not (destination / "raylet.sock").exists()
    assert world_writable(destination) == []
    assert stat.S_IMODE(destination.stat().st_mode) == 0o700
    assert stat.S_IMODE((destination / "raylet.out").stat().st_mode) == 0o600


def test_a_run_folder_is_never_created_world_writable(tmp_path):
    umask = os.umask(0)
    try:
        with RunLock(str(tmp_path / "run")):
            pass
    finally:
        os.umask(umask)
    assert world_writable(tmp_path / "run") == []


def test_the_local_ray_cluster_is_the_machines_size(tmp_path):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert distributed.machine_cpus(str(cgroup)) == len(os.sched_getaffinity(0))
    (cgroup / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert distributed.machine_cpus(str(cgroup)) == min(2, len(os.sched_getaffinity(0)))
    assert distributed.machine_cpus(str(tmp_path / "no-cgroup")) == len(os.sched_getaffinity(0))

    assert distributed.local_ray_cpus(2, 1, cpus=2) == 2  # the cluster has the machine's CPUs, not the request's
    assert distributed.local_ray_cpus(1, 1, cpus=16) == 16
    with pytest.raises(ConfigError) as err:
        distributed.local_ray_cpus(64, 1, cpus=2)
    for needle in ("dist.num_workers 64", "= 64 CPUs", "this machine has 2", "wait forever for the other 62",
                   "At most 2 run here (--dist.num_workers 2)", "--dist.ray_address"):
        assert needle in str(err.value), err.value
    with pytest.raises(ConfigError, match=r"--dist.cpus_per_worker 2 or fewer"):
        distributed.local_ray_cpus(1, 4, cpus=2)
    with pytest.raises(ConfigError, match=r"needs 2 GPUs, but this machine has 1.*--dist.num_workers 1"):
        distributed.local_ray_cpus(2, 1, use_gpu=True, cpus=8, gpus=1)
    assert distributed.local_ray_cpus(2, 1, use_gpu=True, cpus=8, gpus=2) == 8


def test_the_launcher_refuses_more_workers_than_cores_before_ray_starts(demo_data, tmp_path, capsys, monkeypatch):
    def start_local_ray(num_cpus, env):
        raise AssertionError(f"a local Ray cluster of {num_cpus} CPUs was started")

    monkeypatch.setattr(distributed, "start_local_ray", start_local_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    main = runpy.run_path(str(ROOT / "launchers" / "pretrain_llama.py"))["main"]
    cores = distributed.machine_cpus()
    out = tmp_path / "run"
    assert run_command(main, ["--data", demo_data, "--out", str(out), *TINY,
                              "--dist.num_workers", str(cores + 62)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in (f"dist.num_workers {cores + 62}", f"this machine has {cores}", f"--dist.num_workers {cores})",
                   "--dist.ray_address"):
        assert needle in err[0], err[0]
    assert not out.exists()  # refused before the run folder, the dataset checks and Ray


def test_the_resume_command_names_the_run_folder():
    """A run in the default folder (runs/<time>) resumes with --out naming it; `--resume false` would start over."""
    from cllm4rec_dist.launch import resume_command

    assert resume_command(["cllm4rec", "train", "--data", "d"], "/r/runs/1") == [
        "cllm4rec", "train", "--data", "d", "--out", "/r/runs/1"]
    assert resume_command(["cllm4rec", "train", "--out", "x", "--resume", "false"], "/r/x") == [
        "cllm4rec", "train", "--out", "x", "--resume", "true"]
    assert resume_command(["python", "l.py", "--out=x", "--resume=true"], "/r/x") == ["python", "l.py", "--out=x"]


def start(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def interrupt_after_progress(proc: subprocess.Popen, signum: int) -> tuple[str, str]:
    """Send ``signum`` after the first progress line (a step's loss); stdout, stderr of the whole run."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if " loss " in line:
            proc.send_signal(signum)
            break
    else:
        pytest.fail(f"no progress line before the end: {''.join(seen)}{proc.stderr.read()}")
    out, err = proc.communicate(timeout=120)
    return "".join(seen) + out, err


def the_interrupted_line(err: str, signum: int, run: Path, command: list[str]) -> str:
    assert "Traceback" not in err and "SIGTERM received" not in err, err  # no Python traceback, no C++ dump
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    name = signal.Signals(signum).name
    assert line.startswith(f"interrupted ({name}): the run in {run} stopped; resume it "), line
    assert line.endswith(f" with: {shlex.join(command)}"), line  # the command that was run: --out names the folder
    checkpoint = newest_checkpoint(str(run))
    start = f"from {os.path.relpath(checkpoint, run)} with" if checkpoint else "(none in the run folder yet) with"
    assert start in line, line
    assert not (run / LOCK_FILE).exists()
    return line


def test_cllm4rec_train_stops_cleanly_on_ctrl_c_and_sigterm_and_resumes(demo_data, tmp_path):
    """Ctrl-C, then the command it names resumes the run (the lock was released: no takeover warning), then
    SIGTERM stops that one the same way."""
    run = tmp_path / "run"
    args = ["train", "--data", demo_data, "--out", str(run), *LONG, "--checkpoint_every", "8"]
    command = [sys.executable, "-m", "cllm4rec_dist.cli", *args]
    proc = start(command)
    out, err = interrupt_after_progress(proc, signal.SIGINT)
    assert proc.returncode == 130, (out, err)
    the_interrupted_line(err, signal.SIGINT, run, ["cllm4rec", *args])
    saved = newest_checkpoint(str(run))

    proc = start(command)
    out, err = interrupt_after_progress(proc, signal.SIGTERM)
    assert proc.returncode == 143, (out, err)
    assert "in use by another run" not in out + err and "taking the run folder over" not in out + err
    assert not saved or f"[train] resumed at step {int(Path(saved).name.split('-')[-1])} " in out, out
    the_interrupted_line(err, signal.SIGTERM, run, ["cllm4rec", *args])


def ray_processes_of(driver_pid: int) -> list[str]:
    """Command lines of the Ray daemons of the session a driver started (/tmp/ray/session_<time>_<pid>)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"_{driver_pid}/" in cmdline and "session_" in cmdline:
            found.append(cmdline[:200])
    return found


@pytest.mark.slow
def test_the_ray_launcher_stops_cleanly_on_sigterm(demo_data, tmp_path):
    """SIGTERM once the Ray Train run has started: one line, exit status 143, no C++ stack dump, the local Ray
    cluster stopped and its logs copied private to the user."""
    run = tmp_path / "run"
    args = ["launchers/pretrain_llama.py", "--data", demo_data, "--out", str(run), *LONG, "--dist.num_workers", "1",
            "--no-export"]
    proc = start([sys.executable, *args])
    deadline = time.monotonic() + 300
    while not (run / "ray").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # Ray Train's storage folder: fit() has started
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    the_interrupted_line(err, signal.SIGTERM, run, ["python", *args])
    assert (run / "logs" / "ray").is_dir() and world_writable(run) == []
    deadline = time.monotonic() + 20
    while ray_processes_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes_of(proc.pid) == []


def test_the_ray_driver_finds_a_workers_one_line_error_in_rays_failure():
    """A worker's UserError (a diverged loss, a full disk) reaches the driver inside Ray Train's WorkerGroupError;
    the driver re-raises it so the launcher prints its one line (distributed._user_error_in)."""
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from cllm4rec_dist.train.loop import NonFiniteLossError

    diverged = NonFiniteLossError("step 3 (L step): the loss is nan")
    failed = WorkerGroupError("training failed", {1: diverged, 0: RuntimeError("rank 0 saw rank 1 die")})
    assert distributed._user_error_in(failed) is diverged
    assert distributed._user_error_in(ControllerError(failed)) is diverged
    chained = RuntimeError("wrapper")
    chained.__cause__ = diverged
    assert distributed._user_error_in(chained) is diverged
    assert distributed._user_error_in(WorkerGroupError("bug", {0: ValueError("a bug keeps its traceback")})) is None

