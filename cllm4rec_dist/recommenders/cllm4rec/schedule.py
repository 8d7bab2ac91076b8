"""The training schedule as data: a list of blocks, each a named sequence of step kinds.

Step kinds: 'C' (content LLM, text LM), 'L' (collaborative LLM, next-item LM),
'rec' (recommendation finetuning). Phases, in order:

1. warm-up: C epochs only;
2. pretrain: L and C alternating by whole epochs or every k steps;
3. finetune: rec epochs with C steps interleaved, validation after each epoch.

The coordinator's position is (block, step in block); the data position of each
step kind is the number of steps of that kind already run (see batches.py),
so resuming is "continue at block b, step s" and 1 or N workers run the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig


CORPUS_OF = {"C": "content", "L": "collab", "rec": "rec"}


@dataclass(frozen=True)
class Block:
    phase: str            # 'warmup' | 'pretrain' | 'finetune'
    epoch: int            # epoch within the phase
    kinds: tuple[str, ...]  # step kind of each step of the block
    evaluate: bool = False  # run validation when the block ends

    @property
    def steps(self) -> int:
        return len(self.kinds)


def interleave(a: str, n_a: int, b: str, n_b: int, every: int) -> tuple[str, ...]:
    """n_a steps of kind a and n_b of kind b, switching every `every` steps while both last."""
    out: list[str] = []
    while n_a > 0 or n_b > 0:
        take = min(every, n_a)
        out += [a] * take
        n_a -= take
        take = min(every, n_b)
        out += [b] * take
        n_b -= take
    return tuple(out)


def build_schedule(cfg: TrainConfig, steps_per_epoch: dict[str, int]) -> list[Block]:
    """Blocks for the whole run; ``steps_per_epoch`` maps step kind -> steps in one epoch of its corpus."""
    s = cfg.schedule
    n_c, n_l, n_rec = steps_per_epoch.get("C", 0), steps_per_epoch["L"], steps_per_epoch["rec"]
    blocks: list[Block] = []
    if cfg.uses_content:
        blocks += [Block("warmup", e, ("C",) * n_c) for e in range(s.warmup_epochs)]
    for e in range(s.pretrain_epochs):
        if not cfg.uses_content:
            blocks.append(Block("pretrain", e, ("L",) * n_l))
        elif s.alternate == "epoch":
            blocks += [Block("pretrain", e, ("L",) * n_l), Block("pretrain", e, ("C",) * n_c)]
        else:
            blocks.append(Block("pretrain", e, interleave("L", n_l, "C", n_c, s.alternate_every)))
    if cfg.finetune:
        n_fc = math.ceil(n_c * s.finetune_content_fraction) if cfg.uses_content else 0
        for e in range(s.finetune_epochs):
            if s.alternate == "epoch" and n_fc:
                blocks += [Block("finetune", e, ("rec",) * n_rec), Block("finetune", e, ("C",) * n_fc, evaluate=True)]
            else:
                blocks.append(Block("finetune", e, interleave("rec", n_rec, "C", n_fc, s.alternate_every),
                                    evaluate=True))
    elif blocks:
        # LLM-PreRec: recommend with the pretraining head; validate once at the end.
        last = blocks[-1]
        blocks[-1] = Block(last.phase, last.epoch, last.kinds, evaluate=True)
    return [b for b in blocks if b.steps or b.evaluate]


def total_steps(blocks: list[Block]) -> int:
    return sum(b.steps for b in blocks)


def phase_positions(blocks: list[Block]) -> list[tuple[int, int]]:
    """For each block: (steps of its phase in the blocks before it, steps of its whole phase), the place in its
    phase that a learning-rate schedule (train/lr_schedule.py) reads for the block's steps."""
    totals: dict[str, int] = {}
    positions = []
    for block in blocks:
        positions.append(totals.get(block.phase, 0))
        totals[block.phase] = positions[-1] + block.steps
    return [(before, totals[block.phase]) for before, block in zip(positions, blocks)]
