"""Checkpoints: everything needed to continue exactly, but not the frozen backbone.

A checkpoint folder holds
* ``trainer.pt`` (rank 0): coordinator state (block, step, per-kind data position,
  best-validation record), RNG states, the config, the trainable tables/heads and
  the best-validation copy of them;
* each engine's optimizer state: ``optim-<group>.pt`` (torch) or DeepSpeed's
  ``engine-<group>/`` (every rank writes its ZeRO partition).
The frozen backbone is recorded by path and tokenizer hash in the config/manifest
and reloaded from its own checkpoint on resume.

``LocalSink`` writes ``<run>/checkpoints/step-<N>`` under a temporary name and
renames it when every rank is done; ``latest`` names the newest whole one.
``RaySink`` hands per-worker folders to Ray Train, which persists them under the
run's storage path and gives them back to restarted workers.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.distributed as dist

TRAINER_FILE = "trainer.pt"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_checkpoint(trainer, directory: str) -> None:
    """Every rank calls this: engines save their (partitioned) optimizer state, rank 0 the rest."""
    os.makedirs(directory, exist_ok=True)
    for engine in trainer.engines.values():
        engine.save(directory, trainer.r.rank)
    if trainer.r.is_main:
        blob = {"snapshot": trainer.snapshot(), "trainable": trainer.trainable_state(), "best": trainer.best_weights}
        tmp = os.path.join(directory, f"{TRAINER_FILE}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, os.path.join(directory, TRAINER_FILE))


def read_checkpoint(trainer, directory: str) -> None:
    for engine in trainer.engines.values():
        engine.load(directory)
    blob = torch.load(os.path.join(directory, TRAINER_FILE), weights_only=False, map_location="cpu")
    trainer.restore(blob["snapshot"], blob["trainable"], blob["best"])


class LocalSink:
    """Checkpoints in ``<run>/checkpoints`` on a filesystem every rank sees."""

    def __init__(self, run_dir: str, keep: int = 2):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep = keep

    def latest(self) -> str | None:
        pointer = os.path.join(self.root, "latest")
        if not os.path.exists(pointer):
            return None
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(self.root, f.read().strip())
        return path if os.path.exists(os.path.join(path, TRAINER_FILE)) else None

    def save(self, trainer) -> str:
        name = f"step-{trainer.state.global_step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f"{name}.tmp")
        if trainer.r.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        _barrier()
        write_checkpoint(trainer, tmp)
        _barrier()
        if trainer.r.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = os.path.join(self.root, "latest")
            with open(f"{pointer}.tmp", "w", encoding="utf-8") as f:
                f.write(name)
            os.replace(f"{pointer}.tmp", pointer)
            self._prune(keep=name)
        _barrier()
        return final

    def _prune(self, keep: str) -> None:
        steps = sorted(d for d in os.listdir(self.root) if d.startswith("step-") and not d.endswith(".tmp"))
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old != keep:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def has_checkpoint(self) -> bool:
        return self.latest() is not None

    def load_latest(self, trainer) -> bool:
        path = self.latest()
        if path is None:
            return False
        read_checkpoint(trainer, path)
        return True


class RaySink:
    """Checkpoints reported to Ray Train (persisted under RunConfig.storage_path, any pyarrow/fsspec URL)."""

    def __init__(self, keep: int = 2):
        self.keep = keep

    def save(self, trainer) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="cllm4rec-ckpt-") as tmp:
            write_checkpoint(trainer, tmp)
            metrics = {"global_step": trainer.state.global_step, "block": trainer.state.block}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def has_checkpoint(self) -> bool:
        import ray.train

        return ray.train.get_checkpoint() is not None

    def load_latest(self, trainer) -> bool:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            read_checkpoint(trainer, directory)
        return True
