"""`ray job submit` to a running cluster, exactly as the README's cluster section types it.

The test starts a head node (`ray start --head --block`, dashboard on loopback, free ports, its
own temp dir), submits the Ray launcher with `--working-dir .`, follows the job's logs, checks its
final status (`ray job status`) and the artifacts the job wrote on the shared path (metrics,
TensorBoard scalars and projector, Ray checkpoint, export), and always stops the head node it
started (SIGTERM to its process group, never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# The README's "Running on a Ray cluster" section shows these two lines verbatim (tested below).
RAY_START = ("RAY_AUTH_MODE=token ray start --head --port $RAY_PORT --dashboard-host 127.0.0.1 "
             "--dashboard-port $DASHBOARD_PORT --num-cpus 2 --disable-usage-stats --block")
# Ray binds two fixed default ports per head node (dashboard agent 52365, client server 10001): a second Ray on the
# same machine (a local `ray.init()`, e.g. a `cllm4rec tune` running) holds them and this head's job agent never
# comes up. The test gives both free ports; the README says when a user needs the same two flags.
ISOLATION = " --dashboard-agent-listen-port $AGENT_PORT --ray-client-server-port $CLIENT_PORT"
JOB_SUBMIT = ("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . "
              "-- python launchers/pretrain_llama.py --config $CONFIG")

CONFIG = """
projector_sample: 50
schedule:
  warmup_epochs: 0
  pretrain_epochs: 0
  finetune_epochs: 1
  finetune_content_fraction: 0.0
batch:
  batch_size: 8
  max_length: 96
dist:
  num_workers: 2
log_every: 1000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without the auth token): the server is up
        except OSError:
            time.sleep(1)
    pytest.fail(f"the dashboard did not answer on port {port} within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM the process group of the `ray start --block` we started; SIGKILL what is left after 60 s."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()


def submit_job(env: dict, agent_timeout: float = 120) -> tuple[subprocess.CompletedProcess, str]:
    """The README's `ray job submit`. The dashboard answers before the head node's job agent has registered
    (slower on a loaded machine); until then Ray refuses the job ("No available agent to submit job, please try
    again later") and nothing was submitted, so that one answer is retried, as a user would."""
    deadline = time.time() + agent_timeout
    while True:
        submit = subprocess.run(["bash", "-c", JOB_SUBMIT], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=900)
        output = submit.stdout + submit.stderr
        if "No available agent to submit job" not in output or time.time() > deadline:
            return submit, output
        time.sleep(3)


@pytest.fixture(scope="module")
def ray_job(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("rayjob")
    config = root / "cluster.yaml"
    config.write_text(f"data: {demo_data}\nout: {root / 'run'}\n{CONFIG}")  # absolute: the job and the test see them
    # Ray's sockets live under its temp dir and must stay under 107 characters: a short folder of our own.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()), "CONFIG": str(config),
           "AGENT_PORT": str(free_port()), "CLIENT_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # ray and python of this venv
           "RAY_TMPDIR": ray_tmp, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "TOKENIZERS_PARALLELISM": "false"}
    head_log = root / "head.log"
    with open(head_log, "w") as log:
        head = subprocess.Popen(["bash", "-c", RAY_START + ISOLATION], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_dashboard(int(env["DASHBOARD_PORT"]), head, head_log)
        submit, output = submit_job(env)
        job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
        assert job_id, output[-6000:]
        status = job_status(env, job_id.group(1))
        uploaded = sorted(p for p in Path(ray_tmp).glob("ray/session_*/runtime_resources/working_dir_files/_ray_pkg_*")
                          if p.is_dir())  # the job's unpacked working dir
        uploaded_files = ({str(p.relative_to(uploaded[0])) for p in uploaded[0].rglob("*") if p.is_file()} if uploaded
                          else set())
        yield {"run": root / "run", "submit": submit, "output": output, "status": status,
               "uploaded": uploaded_files}
    finally:
        stop_head(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def job_status(env: dict, job_id: str) -> str:
    """The job's final status from the Jobs API through the CLI (same auth mode as the submit):
    "succeeded", "failed", "stopped", or the state of a job that has not ended (e.g. "RUNNING")."""
    command = f"RAY_AUTH_MODE=token ray job status --address http://127.0.0.1:$DASHBOARD_PORT {job_id}"
    out = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    found = (re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", text)
             or re.search(rf"Status for job '{job_id}': (\w+)", text))
    assert found, text
    return found.group(1).removeprefix("was ")


def test_ray_job_submit_runs_the_launcher_on_the_running_cluster(ray_job, demo_data):
    assert ray_job["submit"].returncode == 0, ray_job["output"][-6000:]
    logs = ray_job["output"]  # `ray job submit` follows the job's logs until it ends
    assert ray_job["status"] == "succeeded", logs[-6000:]
    # The launcher joined the cluster it was submitted to (no in-process Ray) and imported the uploaded code.
    joined = re.search(r"\[launch\] joining the Ray cluster at (\S+) \(cllm4rec_dist from (\S+)\)", logs)
    assert joined, logs[-4000:]
    assert "working_dir_files/_ray_pkg_" in joined.group(2)

    run = ray_job["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    for part in ("valid", "test"):
        assert metrics[part]["num_users"] > 0 and metrics[part]["recall@20"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"rec/loss", "valid/recall@20", "test/recall@20"} <= set(events.Tags()["scalars"])
    projector = (run / "tensorboard" / "projector_config.pbtxt").read_text()
    assert projector.count("embeddings {") == 10  # 5 tables at the one validation + 5 best-model tables
    assert list((run / "ray").rglob("trainer.pt"))  # Ray persisted the checkpoint on the storage path
    import pandas as pd

    from cllm4rec_dist.corpus.shards import ShardedDataset

    ids = ShardedDataset(demo_data).read_json("id_maps.json")
    assert pd.read_parquet(run / "export" / "items.parquet")["item_id"].tolist() == ids["items"]


def test_the_uploaded_working_dir_holds_only_what_git_tracks(ray_job):
    """`--working-dir .` leaves out .venv, runs/, shards/, caches: everything .gitignore / .rayignore name."""
    uploaded = ray_job["uploaded"]
    assert "launchers/pretrain_llama.py" in uploaded and "cllm4rec_dist/distributed.py" in uploaded
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    assert uploaded <= set(listed), sorted(uploaded - set(listed))[:20]


def test_readme_cluster_section_is_the_tested_command():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running on a Ray cluster", 1)[1].split("\n## ", 1)[0]
    assert RAY_START in section and JOB_SUBMIT in section
    assert all(flag in section for flag in ISOLATION.split() if flag.startswith("--"))  # the note on a shared machine
