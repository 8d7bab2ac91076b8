"""LLM-FtAll and LLM-Scratch (the whole backbone trained) on several ranks: the backbone group is stepped beside every
step kind's own engine, which runs the backward, so it gets the data-parallel torch Adam engine (a DeepSpeed ZeRO
engine there never reduced its gradients and failed its first step with ``KeyError: 0``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from ranks import run_ranks
from test_distributed import assert_same_losses, launch

from cllm4rec_dist.config import load_config
from cllm4rec_dist.reference import run_reference
from cllm4rec_dist.train.engines import DataParallelEngine
from cllm4rec_dist.train.monitor import read_train_log

SHAPES = [(3, 4), (7,), (2, 2), (5,)]  # 12, 7, 4, 5 elements


def _grads(rank: int) -> list[torch.Tensor | None]:
    """Rank ``rank``'s gradients: parameter 2 has one on rank 0 only, parameter 3 on no rank."""
    gen = torch.Generator().manual_seed(10 + rank)
    grads = [torch.randn(shape, generator=gen) for shape in SHAPES]
    grads[2] = grads[2] if rank == 0 else None
    grads[3] = None
    return grads


def _initial() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _data_parallel_steps(rank: int, world: int) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(t.clone()) for t in _initial()]
    engine = DataParallelEngine("backbone", params, lr=0.1, grad_clip=1.0)
    engine.BUCKET = 10  # several buckets, and a parameter larger than a bucket
    for _ in range(2):
        for param, grad in zip(params, _grads(rank)):
            param.grad = grad
        engine.step()
    return [p.detach().clone() for p in params]


def test_data_parallel_engine_steps_every_rank_like_one_adam_on_the_averaged_gradients():
    ranks = run_ranks(_data_parallel_steps, 2)
    params = [torch.nn.Parameter(t.clone()) for t in _initial()]
    optimizer = torch.optim.Adam(params, lr=0.1)
    for _ in range(2):
        per_rank = [_grads(0), _grads(1)]
        for k, param in enumerate(params):
            given = [g[k] for g in per_rank if g[k] is not None]
            param.grad = sum(given) / 2 if given else None  # a rank without one contributes zero
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    for rank in ranks:
        for mine, ref in zip(rank, params):
            torch.testing.assert_close(mine, ref.detach())
    assert torch.equal(ranks[0][3], _initial()[3])  # no rank had a gradient: untouched


# 98 steps: 3 L, 44 C in one pretraining epoch (L and C alternating), then one finetuning epoch of rec steps
CONFIG = """
schedule:
  warmup_epochs: 0
  pretrain_epochs: 1
  alternate: steps
  finetune_epochs: 1
batch:
  batch_size: 32
  max_length: 96
dist:
  num_workers: 2
log_every: 1000
"""


@pytest.mark.slow
def test_ray_workers_train_the_whole_backbone_like_the_reference(demo_data, tmp_path):
    # LLM-FtAll; LLM-Scratch trains the same "backbone" group through the same engine (only its initial weights
    # differ), so one Ray run covers both and keeps the default suite short.
    ablation = "ftall"
    config_file = tmp_path / f"{ablation}.yaml"
    config_file.write_text(f"data: {demo_data}\nablation: {ablation}\n{CONFIG}")
    reference = load_config(str(config_file))
    reference.out, reference.simulate_ranks = str(tmp_path / "ref"), 2  # one process standing in for 2 workers
    run_reference(reference)
    out = tmp_path / "ray"
    launch([sys.executable, "launchers/pretrain_llama.py", "--config", str(config_file), "--no-export"], out)
    log = read_train_log(out)
    assert {r["kind"] for r in log} == {"L", "C", "rec"}
    assert_same_losses(out, read_train_log(Path(reference.out)))
    # the backbone's Adam state: the same on every rank (averaged gradients), written once by rank 0
    assert list((out / "ray").rglob("optim-backbone.pt")) and not list((out / "ray").rglob("optim-backbone-rank*"))
