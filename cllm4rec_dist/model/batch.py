"""The batches the loader hands to the model: token ids in the extended space, right-padded.

Token space (see corpus/ids.py): vocab ids 0..V-1, user i -> V + i, item j -> V + I + j.
Padding positions hold ``PAD_ID`` (a vocab id) with attention_mask 0; they are never a target.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

PAD_ID = 0


@dataclass
class LMBatch:
    """A batch of documents for the L-step (MAIN = item tokens) or the C-step (MAIN = text tokens).

    Each row is PROMPT followed by MAIN. The loss covers MAIN only: position t predicts
    token t+1 for t in [prompt_lengths-1, lengths-2], so the first MAIN token is
    predicted from the last prompt position.
    """

    input_ids: torch.Tensor       # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 for real tokens
    prompt_lengths: torch.Tensor  # (B,) int64
    lengths: torch.Tensor         # (B,) int64, prompt + main

    def to(self, device) -> "LMBatch":
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_target_tokens(self) -> int:
        return int((self.lengths - self.prompt_lengths).sum())


@dataclass
class RecBatch:
    """A batch of rec prompts (kept items, reordered) with the held-out items as multi-hot targets.

    ``target_rows[k]`` is the batch row of the k-th held-out item ``target_items[k]``
    (an item index 0..J-1). The score vector comes from the last prompt token.
    """

    input_ids: torch.Tensor       # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    lengths: torch.Tensor         # (B,) int64
    users: torch.Tensor           # (B,) int64 user index 0..I-1
    target_rows: torch.Tensor     # (N,) int64
    target_items: torch.Tensor    # (N,) int64

    def to(self, device) -> "RecBatch":
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
