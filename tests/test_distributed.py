"""The real entry points: Ray Train + DeepSpeed ZeRO workers, the deepspeed launcher, worker failure.

Each test runs a launcher as a subprocess, exactly as a user types it, on the demo
shards with a tiny LLaMA-shaped backbone and a short schedule.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from ranks import free_port  # noqa: E402

from cllm4rec_dist.config import load_config
from cllm4rec_dist.distributed import KILL_ENV
from cllm4rec_dist.reference import run_reference
from cllm4rec_dist.train.monitor import read_train_log

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # relative, per-step loss: gloo's all-reduce sums in another order than one process does

# user_lr_scale 3: the ZeRO engines hold the user tables in a param group of their own, at 3x the lr.
# shuffle_buffer 24: every rank streams its partitions (collab/rec 60 documents, content ~640 per rank), so the
# 2-worker runs, their killed-worker resume and the 1-process reference all go through the streamed reader.
CONFIG = """
schedule:
  warmup_epochs: 1
  pretrain_epochs: 1
  alternate: steps
  finetune_epochs: 2
  finetune_content_fraction: 0.1
optim:
  finetune_lr: 0.001
  user_lr_scale: 3.0
batch:
  batch_size: 8
  max_length: 128
  shuffle_buffer: 24
dist:
  num_workers: 2
log_every: 1000
"""


def launch(args: list[str], out: Path, env_extra: dict | None = None, timeout: int = 900) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    proc = subprocess.run([*args, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def assert_same_losses(run_dir: Path, reference: list[dict]) -> None:
    log = read_train_log(run_dir)
    assert [r["global_step"] for r in log] == [r["global_step"] for r in reference]
    for mine, ref in zip(log, reference):
        assert mine["kind"] == ref["kind"]
        assert abs(mine["loss"] - ref["loss"]) <= TOLERANCE * max(1.0, abs(ref["loss"])), (mine, ref)


@pytest.fixture(scope="module")
def config_file(demo_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(f"data: {demo_data}\n{CONFIG}")
    return path


@pytest.fixture(scope="module")
def reference_log(config_file, tmp_path_factory) -> list[dict]:
    """One process standing in for 2 ranks (2 micro-batches of 8 per step): what 2 workers must reproduce."""
    cfg = load_config(str(config_file))
    cfg.out = str(tmp_path_factory.mktemp("ref"))
    cfg.simulate_ranks = 2
    run_reference(cfg)
    return read_train_log(Path(cfg.out))


@pytest.fixture(scope="module")
def ray_run(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "run"
    before = time.time()
    output = launch([sys.executable, "launchers/pretrain_llama.py", "--config", str(config_file)], out)
    ray_run_stopwatch[:] = [before, time.time()]
    return out, output


ray_run_stopwatch: list[float] = []  # [spawned, exited] of the ray_run fixture's launcher (time.time())


def assert_honest_timing(out: Path, spawned: float, exited: float, slack: float = 5.0) -> None:
    """timing.json's split of a command against a stopwatch around it: the parts add up to the total, the start is
    not before the command was spawned, the total is what the stopwatch saw less the exit (the line is printed
    last; the interpreter's exit and the subprocess's reaping follow it)."""
    timing = json.loads((out / "timing.json").read_text())
    split = timing["wall_time"]
    assert sum(v for k, v in split.items() if k != "total") == pytest.approx(split["total"], abs=0.05), split
    assert timing["driver"]["marks"]["process_started"] >= spawned - 0.02
    assert exited - spawned - slack <= split["total"] <= exited - spawned, (split, exited - spawned)


def test_ray_launcher_runs_the_whole_job(ray_run, demo_data):
    out, output = ray_run
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("valid", "test"):
        assert metrics[part]["num_users"] > 0 and metrics[part]["recall@20"] > 0
    # Losses fell (the 16 rec steps of this short run are too few and too noisy to compare;
    # tests/test_train.py checks all three kinds on a longer schedule).
    by_kind = defaultdict(list)
    for row in read_train_log(out):
        by_kind[row["kind"]].append(row["lm"])
    for kind in ("L", "C"):
        n = max(2, len(by_kind[kind]) // 4)
        assert sum(by_kind[kind][-n:]) < sum(by_kind[kind][:n]), kind
    # TensorBoard event files hold the reduced scalars rank 0 wrote.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"C/loss", "L/loss", "rec/loss", "C/mr", "L/lr", "rec/tokens_per_s", "valid/recall@20",
            "test/recall@20", "memory/rss_mb"} <= tags
    assert len(events.Scalars("valid/recall@20")) == 2
    # The console: rank 0's lines relayed, one per block, none of the libraries' own output; the wall-time
    # split of the whole job printed and kept; Ray's full logs (the workers' output too) in the run folder.
    assert "PlacementGroupCleaner" not in output and "Loading weights" not in output
    assert "Token authentication" not in output and "Setting accelerator to CPU" not in output
    assert "[train] schedule:" in output and "[result] wall time:" in output
    assert sum(" epoch " in line and "ETA" in line for line in output.splitlines()) == 4  # 1 + 1 + 2 blocks
    timing = json.loads((out / "timing.json").read_text())
    assert {"ray_start", "fit", "export", "ray_stop"} <= set(timing["driver"]["seconds"])
    assert_honest_timing(out, *ray_run_stopwatch)
    assert f"[result] wall time: {timing['wall_time']['total']:.1f}s" in output
    assert timing["rank0"]["counts"]["validation"] == 2 and "worker_started" in timing["rank0"]["marks"]
    # The worker's imports began when Ray started its process, before the training function (ray_warm.py).
    assert timing["rank0"]["marks"]["warm_imports_started"] < timing["rank0"]["marks"]["worker_started"]
    # ... and the driver's export code while the workers started (it is not imported for the checks before them)
    driver = timing["driver"]["marks"]
    assert driver["fit_started"] <= driver["export_imports_started"] < timing["rank0"]["marks"]["train_started"]
    assert list((out / "logs" / "ray").glob("worker-*.out")) and (out / "progress.log").exists()
    # DeepSpeed's inference-only shared-memory op was neither built nor loaded (its JIT compile cost 20-95 s).
    worker_logs = "".join(p.read_text(errors="replace") for p in (out / "logs" / "ray").glob("worker-*"))
    assert "shm_comm" not in worker_logs
    # On the cluster it started, Ray Train ran no actor of a shared cluster's machinery (ray_local.py): no
    # autoscaling coordinator, placement-group cleaner or dataset manager, each a process on the workers' cores.
    actors = Counter(line.split(":actor_name:", 1)[1].strip() for p in (out / "logs" / "ray").glob("worker-*.out")
                     for line in p.read_text(errors="replace").splitlines() if line.startswith(":actor_name:"))
    assert actors == {"TrainController": 1, "SynchronizationActor": 1, "RayTrainWorker": 2}, actors
    # Ray persisted the checkpoints in <run>/ray/checkpoint_<time> (no ray/<name>/ below); the config was saved.
    assert list((out / "ray").glob("checkpoint_*/trainer.pt")) and not (out / "ray" / out.name).exists()
    assert load_config(str(out / "config.yaml")).dist.num_workers == 2
    # The export round-trips the original ids.
    import pandas as pd

    from cllm4rec_dist.corpus.shards import ShardedDataset

    export = out / "export"
    ids = ShardedDataset(demo_data).read_json("id_maps.json")
    assert json.loads((export / "export.json").read_text())["weights"] == "best"
    assert pd.read_parquet(export / "users.parquet")["user_id"].tolist() == ids["users"]
    assert pd.read_parquet(export / "items.parquet")["item_id"].tolist() == ids["items"]


def test_two_ray_workers_match_the_single_process_reference(ray_run, reference_log):
    out, _ = ray_run
    assert_same_losses(out, reference_log)


def test_a_killed_worker_is_restarted_and_the_run_continues_from_the_last_checkpoint(config_file, reference_log,
                                                                                     tmp_path):
    out = tmp_path / "run"
    output = launch([sys.executable, "launchers/pretrain_llama.py", "--config", str(config_file),
                     "--checkpoint_every", "10", "--no-export"], out, env_extra={KILL_ENV: "1:25"})
    assert "killed at step 25" in output
    assert (out / ".killed-rank1-step25").exists()
    # Ray registers a reported checkpoint asynchronously: the one written just before the kill
    # (step 20) may or may not be the latest when the restarted workers ask for it.
    resumed = [int(m) for m in re.findall(r"resumed at step (\d+)", output)]
    assert resumed and set(resumed) <= {10, 20}, output[-3000:]
    assert_same_losses(out, reference_log)  # same losses as a run that was never interrupted


def test_deepspeed_launcher_finetunes_an_int8_backbone_from_a_pretraining_checkpoint(config_file, ray_run, tmp_path):
    out, _ = ray_run
    checkpoint = max((out / "ray").rglob("trainer.pt"), key=os.path.getmtime).parent
    ft = tmp_path / "ft"
    output = launch([sys.executable, "-m", "deepspeed.launcher.runner",
                     "--master_port", str(free_port()), "--num_gpus", "2", "launchers/finetune.py",
                     "--config", str(config_file), "--init_from", str(checkpoint), "--dist.ds_config",
                     "ds_configs/zero1.json", "--model.precision", "int8", "--no-export"], ft)
    assert "(int8)" in output  # the frozen backbone really is bitsandbytes int8 on every rank
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["best"]["phase"] == "finetune"
    assert {r["phase"] for r in read_train_log(ft)} == {"finetune"}
    # Starting from the trained tables, the first validation is already far above a random start.
    first = metrics["history"][0]["recall@20"]
    assert first > 0.5 * json.loads((out / "metrics.json").read_text())["valid"]["recall@20"], output[-2000:]


def test_deepspeed_launcher_with_no_flags_runs_the_embedded_default_in_one_run_folder(tmp_path):
    """`deepspeed launchers/finetune.py` with no --config, --data or --out: the demo config and dataset, and one
    runs/<time> folder that rank 0 names for both ranks (each rank reading the clock could name its own)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner",
                           "--master_port", str(free_port()), "--num_gpus", "2",
                           str(REPO / "launchers" / "finetune.py"), "--schedule.finetune_epochs", "1", "--no-export"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    exited = time.time()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    [run] = list((tmp_path / "runs").iterdir())
    # The wall time is the `deepspeed` command's, from its launcher's start (it once said "wall time: 0s").
    # After rank 0's last line the launcher notices (it polls its ranks every second) and its two processes (the
    # runner and launch.py) exit: seconds no rank can time (8.7 s on a 2-core machine at load 20).
    assert_honest_timing(run, spawned, exited, slack=20.0)
    assert json.loads((run / "timing.json").read_text())["wall_time"]["total"] > 5
    [checkpoint] = list((run / "checkpoints").glob("step-*"))
    assert {p.name for p in checkpoint.glob("files-rank*.json")} == {"files-rank0.json", "files-rank1.json"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["phase"] == "finetune" and metrics["test"]["recall@20"] > 0


def test_zero3_is_refused_with_a_clear_error(config_file, tmp_path):
    from cllm4rec_dist.distributed import check_combination
    from cllm4rec_dist.train.engines import load_ds_config

    cfg = load_config(str(config_file))
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg.dist.ds_config = str(zero3)
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported.*zero2.json"):
        check_combination(cfg, load_ds_config(str(zero3), 8, 2, 0.0))


def test_a_joined_cluster_keeps_ray_trains_own_machinery():
    """Only a cluster the launcher started (and stops) runs without the autoscaling coordinator, the placement-group
    cleaner and the dataset manager, and with the torch-free process-group config on CPU workers; joining a cluster,
    or passing Ray datasets, gets the plain TorchTrainer."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from cllm4rec_dist.ray_local import GlooProcessGroup, LocalScalingPolicy, LocalTrainer, local_trainer_class

    assert local_trainer_class(local_cluster=False) is TorchTrainer
    assert local_trainer_class(local_cluster=True, has_datasets=True) is TorchTrainer
    assert local_trainer_class(local_cluster=True) is LocalTrainer

    scaling = ScalingConfig(num_workers=2)
    plain = TorchTrainer(lambda: None, scaling_config=scaling)._create_default_callbacks()
    local_trainer = LocalTrainer(lambda: None, scaling_config=scaling)
    local = local_trainer._create_default_callbacks()
    skipped = (DatasetsCallback, PlacementGroupCleanerCallback)
    assert sum(isinstance(cb, skipped) for cb in plain) == 2
    assert [type(cb) for cb in local] == [type(cb) for cb in plain if not isinstance(cb, skipped)]
    assert isinstance(local_trainer.backend_config, GlooProcessGroup)
    # Ray's own config where the workers have GPUs (NCCL, the CUDA device set per worker)
    gpu = LocalTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2, use_gpu=True)).backend_config
    assert isinstance(gpu, TorchConfig) and gpu.backend == "nccl"
    policy = LocalScalingPolicy(scaling)
    policy.after_controller_start(None)  # sends nothing: there is no coordinator client to send it with
    assert policy._coordinator_client is None
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2


def test_the_controller_unpickles_the_local_runs_policy_and_process_group_without_torch():
    """What Ray Train's controller actor receives from `LocalTrainer` (the scaling policy and the backend config, by
    cloudpickle as Ray sends them) loads in a fresh interpreter without importing torch: the controller, on the path
    to the workers' start, no longer spends a second of a core importing it (ray_local.py). Ray's own TorchConfig
    does import it (the check that the probe can tell)."""
    import ray.cloudpickle as cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    from cllm4rec_dist.ray_local import GlooProcessGroup, LocalScalingPolicy

    # One fresh interpreter: ours first, then Ray's TorchConfig (the check that the probe can tell).
    probe = ("import sys; from ray import cloudpickle; ours, ray_s = cloudpickle.loads(sys.stdin.buffer.read()); "
             "cloudpickle.loads(ours); print('torch' in sys.modules); cloudpickle.loads(ray_s); "
             "print('torch' in sys.modules)")
    payload = cloudpickle.dumps((cloudpickle.dumps((LocalScalingPolicy(ScalingConfig(num_workers=2)),
                                                    GlooProcessGroup())), cloudpickle.dumps(TorchConfig())))
    done = subprocess.run([sys.executable, "-c", probe], input=payload, capture_output=True, cwd=REPO, check=True)
    assert done.stdout.decode().split() == ["False", "True"], done.stdout


def test_only_a_training_worker_starts_its_imports_when_ray_starts_its_process():
    """ray_warm.start, Ray's worker_process_setup_hook on a local cluster: in a process whose environment names the
    recommender, it imports the model's code on a thread and returns at once; in any other (Ray's own actors) it
    imports nothing. Fresh interpreters, so that nothing here is imported already."""
    import ray._private.ray_constants as ray_constants

    from cllm4rec_dist.distributed import _local_ray_env
    from cllm4rec_dist.ray_warm import HOOK, HOOK_ENV, WARM_ENV

    # The variable Ray's default_worker.py reads the hook from, under the name this Ray gives it.
    assert HOOK_ENV == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    assert _local_ray_env()[HOOK_ENV] == HOOK
    probe = ("import sys, threading; from cllm4rec_dist import ray_warm; ray_warm.start(); "
             "workers = [w for w in threading.enumerate() if w.name == 'cllm4rec-warm-imports']; "
             "running = [w.is_alive() for w in workers]; [w.join() for w in workers]; "
             "print(running, ray_warm.started_at is not None, "
             "'transformers' in sys.modules, 'deepspeed' in sys.modules, 'torch._inductor.compile_fx' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != WARM_ENV}
    idle = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert idle.stdout.splitlines()[-1].split() == ["[]", "False", "False", "False", "False"], idle.stdout
    warm = subprocess.run([sys.executable, "-c", probe], env=env | {WARM_ENV: "cllm4rec"}, capture_output=True,
                          text=True, check=True)
    # start() returned with the imports still running on their thread, and they completed there, torch.compile's
    # inductor included, which the first deepspeed.initialize would otherwise import (the last line: DeepSpeed
    # prints a line of its own first).
    assert warm.stdout.splitlines()[-1].split() == ["[True]", "True", "True", "True", "True"], warm.stdout
