"""Batches of one corpus for one rank, as a pure function of (epoch, step, rank).

Every rank holds the corpus's token ids in memory (documents are small: the
Amazon Beauty content corpus is ~10M tokens) and the same per-epoch global
permutation. Global step s of epoch e covers positions [s*B*W, (s+1)*B*W) of
that permutation; rank r takes its B-slice. Hence:

* every rank runs exactly ``steps_per_epoch`` steps (the last global batch wraps
  around to the start of the permutation, so no rank runs short and no
  all-reduce hangs);
* one process accumulating W micro-batches sees exactly the documents W ranks
  see (the distributed-vs-reference test relies on it);
* resuming needs no iterator state: (epoch, step) is the data position.

Online randomness (stochastic item reordering, masked prompting) is seeded by
(seed, epoch, document), so it is identical across ranks, world sizes and resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.model.batch import PAD_ID, LMBatch, RecBatch

_STREAM = {"order": 1, "mask": 2, "perm": 3}


def doc_rng(seed: int, epoch: int, doc: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, doc, _STREAM[stream]])


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token rows: (input_ids, attention_mask, lengths)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max())
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids, mask, lengths


@dataclass
class BatchSettings:
    batch_size: int = 16
    """Documents per rank per step."""
    max_length: int = 1024
    """Prompt + main tokens; longer item lists keep a random subset (reordering on) or the latest items."""
    reorder: bool = True
    """Stochastic item reordering (off = the paper's LLM-FixOrd ablation)."""
    mask_ratio: float = 0.2
    """Rec step: share of a user's train items held out as targets (at least one kept, one held out)."""
    seed: int = 0
    """Seed of the data order, item reordering and masked prompting (the table init has its own)."""


class CorpusBatches:
    """Deterministic batches of one corpus ('collab', 'content' or 'rec') for any rank of a world."""

    def __init__(self, name: str, docs: list[dict], space: TokenSpace, settings: BatchSettings, world_size: int = 1):
        if not docs:
            raise ValueError(f"corpus {name} has no documents")
        self.name = name
        self.docs = docs
        self.space = space
        self.s = settings
        self.world_size = world_size
        self._corpus_seed = sum(ord(c) for c in name)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.docs) / (self.s.batch_size * self.world_size))

    def doc_indices(self, epoch: int, step: int, rank: int) -> np.ndarray:
        perm = np.random.default_rng([self.s.seed, self._corpus_seed, epoch, _STREAM["perm"]]).permutation(len(self.docs))
        start = (step * self.world_size + rank) * self.s.batch_size
        return perm[np.arange(start, start + self.s.batch_size) % len(self.docs)]

    def batch(self, epoch: int, step: int, rank: int = 0) -> LMBatch | RecBatch:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"{self.name}: step {step} outside 0..{self.steps_per_epoch - 1}")
        indices = self.doc_indices(epoch, step, rank)
        if self.name == "rec":
            return self._rec_batch(indices, epoch)
        return self._lm_batch(indices, epoch)

    def _items(self, items: list[int], epoch: int, doc: int, budget: int) -> list[int]:
        """Reorder (or keep) a user's items and fit them into ``budget`` tokens."""
        items = list(items)
        if self.s.reorder:
            items = [items[k] for k in doc_rng(self.s.seed, epoch, doc, "order").permutation(len(items))]
            return items[: max(budget, 0)]
        return items[-budget:] if budget > 0 else []

    def _lm_batch(self, indices: np.ndarray, epoch: int) -> LMBatch:
        rows, prompt_lengths = [], []
        for doc_index in indices:
            doc = self.docs[doc_index]
            prompt, main = doc["prompt"], doc["main"]
            budget = self.s.max_length - len(prompt)
            if doc["kind"] == "collab":  # MAIN is a set of items: reorder online
                main = self._items(main, epoch, int(doc_index), budget)
            else:
                main = main[:budget]
            rows.append(prompt + main)
            prompt_lengths.append(len(prompt))
        ids, mask, lengths = pad(rows)
        return LMBatch(ids, mask, torch.tensor(prompt_lengths, dtype=torch.long), lengths)

    def _rec_batch(self, indices: np.ndarray, epoch: int) -> RecBatch:
        rows, users, target_rows, target_items = [], [], [], []
        for row, doc_index in enumerate(indices):
            doc = self.docs[doc_index]
            kept, held_out = mask_items(doc["items"], self.s.mask_ratio,
                                        doc_rng(self.s.seed, epoch, int(doc_index), "mask"))
            budget = self.s.max_length - len(doc["prompt_prefix"]) - len(doc["prompt_suffix"])
            kept = self._items(kept, epoch, int(doc_index), budget)
            rows.append(doc["prompt_prefix"] + [self.space.item_token(i) for i in kept] + doc["prompt_suffix"])
            users.append(doc["user"])
            target_rows.extend([row] * len(held_out))
            target_items.extend(held_out)
        ids, mask, lengths = pad(rows)
        return RecBatch(ids, mask, lengths, torch.tensor(users, dtype=torch.long),
                        torch.tensor(target_rows, dtype=torch.long), torch.tensor(target_items, dtype=torch.long))


def mask_items(items: list[int], ratio: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Masked prompting: hold out each item with probability ``ratio``; keep >= 1 and hold out >= 1 when n >= 2."""
    items = list(items)
    n = len(items)
    if n < 2:
        return items, []
    held = rng.random(n) < ratio
    if not held.any():
        held[rng.integers(n)] = True
    if held.all():
        held[rng.integers(n)] = False
    return [i for i, h in zip(items, held) if not h], [i for i, h in zip(items, held) if h]


def prediction_prompts(docs: list[dict], space: TokenSpace, style: str = "rec", max_length: int = 1024,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts for scoring: ALL train items of each user (no masking).

    style 'rec' = prefix + items + suffix (the finetuned RecLLM); 'collab' = prefix +
    items, predicting the next item as the L-step does (the paper's LLM-PreRec).
    Item order is a fixed shuffle (seeded) so it matches neither file order nor ids.
    """
    rows = []
    for doc in docs:
        suffix = doc["prompt_suffix"] if style == "rec" else []
        items = list(doc["train"])
        order = doc_rng(seed, 0, int(doc["user"]), "order").permutation(len(items))
        budget = max_length - len(doc["prompt_prefix"]) - len(suffix)
        items = [items[k] for k in order][:budget]
        rows.append(doc["prompt_prefix"] + [space.item_token(i) for i in items] + suffix)
    return pad(rows)
