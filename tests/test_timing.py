"""Where the wall time goes: the start of the process from the boot clock (never /proc/stat's btime), the start
of a `deepspeed` command from its launcher process, and a split whose parts add up to its total.

The launchers' own totals against a stopwatch are checked where they run (tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllm4rec_dist.launch import wall_time_line, wall_time_split
from cllm4rec_dist.train import timing
from cllm4rec_dist.train.timing import process_started_at, started_at

REPO = Path(__file__).resolve().parents[1]
TICK = 1 / os.sysconf("SC_CLK_TCK")  # /proc gives a process's start in whole clock ticks
PROBE = ("import time; first = time.time(); import json, sys; sys.path.insert(0, {repo!r}); "
         "from cllm4rec_dist.train.timing import job_started_at, process_started_at; "
         "print(json.dumps([first, process_started_at(), job_started_at()]))")


def probe(argv_prefix: list[str] = (), cwd=None) -> list[float]:
    out = subprocess.run([*argv_prefix, sys.executable, "-c", PROBE.format(repo=str(REPO))], capture_output=True,
                         text=True, check=True, cwd=cwd).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_process_start_is_between_its_spawn_and_its_first_statement():
    """The real /proc and clocks: a child's start is not before the parent spawned it, nor after it ran."""
    for _ in range(3):
        before = time.time()
        first, started, job = probe()
        assert before - TICK <= started <= first, (before, started, first)
        assert job == pytest.approx(started, abs=1e-3)  # no launcher above it: the same process


EXEC_PROBE = ("import time; first = time.time(), time.process_time(); import json, sys; sys.path.insert(0, {repo!r}); "
              "from cllm4rec_dist.train.timing import launch_started_at, process_started_at; "
              "print(json.dumps([first[0], process_started_at(), launch_started_at(*first, idle_s=1.0)]))")


@pytest.mark.parametrize("shell_waits", [False, True])
def test_a_launcher_exec_d_by_a_shell_after_a_wait_is_timed_from_its_first_statement(shell_waits):
    """`bash -c "setup && python launcher.py"` runs python in the shell's own process once setup ends: /proc then
    gives the shell's start, and a job's wall time would count the setup. Here the shell waits 2.5 s, then execs
    Python: the launch clock starts at the launcher's first statement. Without the wait it is the process's start
    (the interpreter's start and imports count)."""
    wait = "sleep 2.5; " if shell_waits else ""
    code = shlex.quote(EXEC_PROBE.format(repo=str(REPO)))
    out = subprocess.run(["bash", "-c", f"{wait}exec {shlex.quote(sys.executable)} -c {code}"],
                         capture_output=True, text=True, check=True).stdout
    first, process_start, launch_start = json.loads(out.strip().splitlines()[-1])
    if shell_waits:
        assert first - process_start > 2.4 and launch_start == first
    else:
        assert first - process_start < 2.0 and launch_start == pytest.approx(process_start, abs=1e-3)


def test_the_start_does_not_read_btime(monkeypatch):
    """Regression: on a VM restored from a snapshot /proc/stat's btime was minutes off (a job's timing line put
    145 s on "python start"). The start comes from the process's age on the boot clock instead: here a btime
    that is 145 s off is there to be read, and must not move the answer."""
    stat = "4242 (python3 -c x) S 1 4242 4242 0 -1 4194304 " + " ".join(["0"] * 12) + " 12345 " + "0 " * 30
    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/stat":  # what the old code read: boot time 145 s after the truth
            from io import StringIO

            return StringIO(f"cpu 1 2 3\nbtime {int(time.time()) - 3600 + 145}\n")
        if str(path) == "/proc/self/stat":
            from io import StringIO

            return StringIO(stat)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(timing.time, "clock_gettime", lambda clock: 130.0)  # 6.55 s after the start at tick 12345
    monkeypatch.setattr(timing.time, "time", lambda: 1_000_000.0)
    monkeypatch.setattr(timing.os, "sysconf", lambda name: 100)
    assert process_started_at() == pytest.approx(1_000_000.0 - (130.0 - 123.45))
    assert started_at(stat, 130.0, 1_000_000.0, 100) == pytest.approx(999_993.45)


def test_a_rank_under_the_deepspeed_launcher_is_timed_from_the_launcher(tmp_path):
    """A rank's job started when the `deepspeed` command did: the oldest ancestor whose command is the launcher."""
    launcher = tmp_path / "deepspeed"  # a program named like the launcher, which starts its "rank" after 0.5 s
    launcher.write_text("import subprocess, sys, time\ntime.sleep(0.5)\n"
                        f"sys.exit(subprocess.call([sys.executable, '-c', {PROBE.format(repo=str(REPO))!r}]))\n")
    before = time.time()
    first, started, job = probe_via(launcher)
    assert before - TICK <= job <= started - 0.4, (before, job, started)
    assert started <= first


def probe_via(launcher: Path) -> list[float]:
    out = subprocess.run([sys.executable, str(launcher)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_word_that_mentions_the_launcher_is_not_the_launcher(tmp_path):
    """`pytest -k deepspeed` above a rank is not its launcher: the chain stops at the launcher's own processes."""
    assert timing._names_launcher("/venv/bin/deepspeed", "deepspeed")
    assert timing._names_launcher("deepspeed.launcher.runner", "deepspeed")
    assert not timing._names_launcher("test_deepspeed_launcher", "deepspeed")
    assert not timing._names_launcher("tests/deepspeed_stuff.py", "deepspeed")


TIMING = {
    "driver": {"seconds": {"driver_imports": 1.5, "demo_data": 0.2, "ray_start": 0.4, "fit": 20.0, "ray_stop": 1.0,
                           "export": 0.3},
               "marks": {"process_started": 100.0, "started": 101.0, "fit_started": 104.0, "fit_finished": 124.0,
                         "finished": 125.5}},
    "rank0": {"seconds": {"worker_imports": 0.5, "data": 0.3, "engines": 0.6, "train_steps": 15.0, "validation": 1.0},
              "counts": {"train_steps": 900, "validation": 6},
              "marks": {"worker_started": 108.0, "train_started": 110.0, "train_finished": 123.0}},
}


def test_the_parts_of_the_split_add_up_to_its_total():
    split = wall_time_split(TIMING)
    assert split["total"] == pytest.approx(25.5)
    assert sum(v for k, v in split.items() if k != "total") == pytest.approx(split["total"], abs=0.05)
    assert split["python_start_imports"] == 1.0 and split["worker_start"] == 4.0 and split["workers_stop"] == 1.0
    line = wall_time_line(TIMING)
    assert line.startswith("25.5s (59% in train steps) = python start imports 1.0s") and "(900x)" in line


def test_parsing_a_config_imports_no_torch():
    """The Ray driver parses and checks its config while its local Ray starts in the background; torch and
    transformers (about 3 s of imports on 2 cores) come after. A setting validated against a module that imports
    torch would put them back before Ray starts (an A-LLMRec score-mode check once did)."""
    code = (
        "import sys\n"
        "from cllm4rec_dist.launch import parse\n"
        "for config in ('configs/demo.yaml', 'configs/allmrec-demo.yaml', 'configs/llama7b-cpu.yaml'):\n"
        "    parse('x', ['--config', config])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'ray', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_drivers_checks_import_none_of_the_models_code(demo_data, demo_loo_data):
    """The Ray driver checks the data while its local cluster starts, then starts the workers: transformers (about
    3.5 s of imports on 2 cores, which the recipes' modules pull in) would hold that start back
    (recommenders/<name>/checks.py)."""
    code = (
        "import sys\n"
        "from cllm4rec_dist.config import config_from_dict\n"
        "from cllm4rec_dist.corpus.shards import ShardedDataset\n"
        "from cllm4rec_dist.recommenders import recommender\n"
        f"for name, data in (('cllm4rec', {demo_data!r}), ('allmrec', {demo_loo_data!r})):\n"
        "    cfg = config_from_dict({'recommender': name, 'data': data})\n"
        "    recommender(name).check_data(cfg, ShardedDataset(data))\n"
        "print(sorted(m for m in ('transformers', 'deepspeed', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_run_without_an_adapter_imports_no_peft(demo_data, tmp_path):
    """peft (and the bitsandbytes kernels it pulls in) is ~1.5 s of imports in every process, each Ray worker's
    included; a run with model.adapter none has no LoRA layer to look for (the dropout switch once imported it)."""
    from test_trust import TINY

    code = (
        "import sys\n"
        "from cllm4rec_dist.cli import main\n"
        f"assert main(['train', '--data', {demo_data!r}, '--out', {str(tmp_path / 'run')!r}, *{TINY!r}]) == 0\n"
        "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
