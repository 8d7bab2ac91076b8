"""This process's place in a training job: its rank, the world size and the micro-batches it stands in for.

Every recipe's coordinator (CLLM4Rec's ``Trainer``, A-LLMRec's ``ALLMRecTrainer``) gets one from its entry point:
``Rank(0, 1, accumulate=W)`` from the single-process reference, ``Rank(rank, world)`` on a Ray/torchrun worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Rank:
    rank: int = 0
    world_size: int = 1
    accumulate: int = 1
    """Micro-batches per step on this rank; >1 lets one process reproduce a multi-rank run."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a tensor of scalars across ranks (what rank 0 logs): ONE all-reduce, whatever its shape."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world_size
