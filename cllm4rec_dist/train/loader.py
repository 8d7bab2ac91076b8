"""Batches of one rank's part of a corpus, as a pure function of (epoch, step).

Each rank reads only its own shards: rank r of W takes shards r, r+W, r+2W, ...
(with fewer shards than ranks, every rank reads all and keeps every W-th document).
The manifest's per-shard counts tell every rank every partition's size, so all
ranks agree, without communicating, on ``steps_per_epoch = max_r ceil(n_r / B)``;
a rank with fewer documents wraps around its own permutation, so no rank runs
short and no all-reduce hangs.

A single process standing in for W ranks (``simulate_ranks``) builds the same W
partitions as streams and accumulates one micro-batch from each: it sees exactly
what W workers see. Resuming needs no iterator state: (epoch, step) is the data
position. Online randomness (the per-epoch order, stochastic item reordering,
masked prompting) is seeded by (seed, epoch, global document index), so it does
not depend on which rank holds a document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.prompts import DOC_STREAMS, arrange_items, doc_rng, rec_prompt
from cllm4rec_dist.corpus.shards import partition_doc_ids
from cllm4rec_dist.model.batch import LMBatch, RecBatch


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
    pack: bool = True
    """Pack several documents into one row (block-diagonal causal attention, positions restarting per
    document) instead of one right-padded row each: same losses, far fewer padding tokens computed."""


def partition_sizes(entry: dict, world: int) -> list[int]:
    """Documents per rank for a corpus's manifest entry (no shard is read)."""
    return [len(partition_doc_ids(entry, r, world)) for r in range(world)]


def read_partition(data, corpus: str, rank: int, world: int) -> tuple[list[dict], np.ndarray]:
    """(documents, their global indices) of ``rank``'s part of ``corpus`` in a ShardedDataset."""
    entry = data.corpus_entry(corpus)
    shards = entry["shards"]
    ids = partition_doc_ids(entry, rank, world)
    if len(shards) < world:  # too few shards to split: read all, keep every world-th document
        docs = data.read_corpus(corpus)
        return [docs[i] for i in ids], ids
    docs = []
    for k in range(rank, len(shards), world):
        docs.extend(data.iter_shard(shards[k]))
    return docs, ids


class CorpusBatches:
    """Deterministic batches of one rank's partition of a corpus ('collab', 'content' or 'rec')."""

    def __init__(self, name: str, docs: list[dict], doc_ids: np.ndarray, space: TokenSpace, settings: BatchSettings,
                 steps_per_epoch: int, stream: int = 0):
        if not docs:
            raise ValueError(f"corpus {name}: this rank's partition is empty")
        self.name, self.docs, self.doc_ids, self.space, self.s = name, docs, doc_ids, space, settings
        self.steps_per_epoch = steps_per_epoch
        self.stream = stream
        self._corpus_seed = sum(ord(c) for c in name)

    @classmethod
    def for_rank(cls, data, name: str, space: TokenSpace, settings: BatchSettings, rank: int = 0,
                 world: int = 1) -> "CorpusBatches":
        entry = data.corpus_entry(name)
        sizes = partition_sizes(entry, world)
        if min(sizes) == 0:
            raise ValueError(f"corpus {name} has {entry['num_docs']} documents, too few for {world} ranks")
        steps = max(math.ceil(n / settings.batch_size) for n in sizes)
        docs, ids = read_partition(data, name, rank, world)
        return cls(name, docs, ids, space, settings, steps, stream=rank)

    def doc_positions(self, epoch: int, step: int) -> np.ndarray:
        """Positions (in this partition) of the documents of batch (epoch, step)."""
        order = np.random.default_rng([self.s.seed, self._corpus_seed, epoch, self.stream, DOC_STREAMS["perm"]])
        perm = order.permutation(len(self.docs))
        start = step * self.s.batch_size
        return perm[np.arange(start, start + self.s.batch_size) % len(self.docs)]

    def batch(self, epoch: int, step: int) -> LMBatch | RecBatch:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"{self.name}: step {step} outside 0..{self.steps_per_epoch - 1}")
        positions = self.doc_positions(epoch, step)
        if self.name == "rec":
            return self._rec_batch(positions, epoch)
        return self._lm_batch(positions, epoch)

    def _items(self, items: list[int], epoch: int, doc: int, budget: int) -> list[int]:
        """Reorder (or keep) a user's items and fit them into ``budget`` tokens (corpus/prompts.py)."""
        order = doc_rng(self.s.seed, epoch, doc, "order") if self.s.reorder else None
        return arrange_items(items, budget, order)

    def _lm_batch(self, positions: np.ndarray, epoch: int) -> LMBatch:
        rows, prompt_lengths = [], []
        for position in positions:
            doc = self.docs[position]
            prompt, main = doc["prompt"], doc["main"]
            budget = self.s.max_length - len(prompt)
            if doc["kind"] == "collab":  # MAIN is a set of items: reorder online
                main = self._items(main, epoch, int(self.doc_ids[position]), budget)
            else:
                main = main[:budget]
            rows.append(prompt + main)
            prompt_lengths.append(len(prompt))
        return LMBatch.from_rows(rows, prompt_lengths, pack=self.s.pack)

    def _rec_batch(self, positions: np.ndarray, epoch: int) -> RecBatch:
        rows, users, target_rows, target_items = [], [], [], []
        for row, position in enumerate(positions):
            doc, doc_id = self.docs[position], int(self.doc_ids[position])
            kept, held_out = mask_items(doc["items"], self.s.mask_ratio, doc_rng(self.s.seed, epoch, doc_id, "mask"))
            budget = self.s.max_length - len(doc["prompt_prefix"]) - len(doc["prompt_suffix"])
            kept = self._items(kept, epoch, doc_id, budget)
            rows.append(rec_prompt(doc, kept, self.space))
            users.append(doc["user"])
            target_rows.extend([row] * len(held_out))
            target_items.extend(held_out)
        return RecBatch.from_rows(rows, users, target_rows, target_items, pack=self.s.pack)


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

