"""Where a Ray run keeps its checkpoints: <run>/ray/checkpoint_<time> (one `ray` folder, not three as in
runs/ray/ray/ray/checkpoint_*), a run folder of the old layout still resumes from its own, and a shared
dist.storage_path holds one folder per run. The real run is checked in tests/test_distributed.py."""

from __future__ import annotations

from cllm4rec_dist.config import TrainConfig
from cllm4rec_dist.distributed import ray_storage
from cllm4rec_dist.launch import newest_checkpoint


def config(out) -> TrainConfig:
    cfg = TrainConfig()
    cfg.out = str(out)
    return cfg


def test_a_new_run_keeps_its_checkpoints_in_run_slash_ray(tmp_path):
    assert ray_storage(config(tmp_path / "ray")) == (str(tmp_path / "ray"), "ray")  # runs/ray/ray/checkpoint_*


def test_a_run_folder_of_the_old_layout_resumes_from_its_own_checkpoints(tmp_path):
    run = tmp_path / "myrun"
    (run / "ray" / "myrun" / "checkpoint_2026-12-01_10-00-00.000001").mkdir(parents=True)
    assert ray_storage(config(run)) == (str(run / "ray"), "myrun")
    assert newest_checkpoint(str(run)).endswith("ray/myrun/checkpoint_2026-12-01_10-00-00.000001")


def test_a_shared_storage_path_holds_a_folder_per_run(tmp_path):
    cfg = config(tmp_path / "runs" / "exp1")
    cfg.dist.storage_path = "s3://bucket/ray"
    assert ray_storage(cfg) == ("s3://bucket/ray", "exp1")


def test_the_newest_checkpoint_of_the_new_layout_is_found(tmp_path):
    for stamp in ("2026-12-06_07-00-00.000001", "2026-12-06_07-05-00.000001"):
        (tmp_path / "ray" / f"checkpoint_{stamp}").mkdir(parents=True)
    assert newest_checkpoint(str(tmp_path)).endswith("ray/checkpoint_2026-12-06_07-05-00.000001")
