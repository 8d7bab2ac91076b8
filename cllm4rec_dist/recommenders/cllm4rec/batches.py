"""Batches of one rank's part of a corpus, as a pure function of (epoch, step).

Each rank reads only its own shards: rank r of W takes shards r, r+W, r+2W, ...
(with fewer shards than ranks, every rank reads all and keeps every W-th document).
The manifest's per-shard counts tell every rank every partition's size, so all
ranks agree, without communicating, on ``steps_per_epoch = max_r ceil(n_r / B)``;
a rank with fewer documents wraps around its own epoch order, so no rank runs
short and no all-reduce hangs.

The documents come from ``corpus/stream.py``'s ``PartitionReader``: the shards are
streamed through a seeded shuffle buffer of ``batch.shuffle_buffer`` documents
(0: the whole partition, read once at setup and kept: the in-memory case). The
order is a pure function of (seed, corpus, epoch, stream), so (epoch, step) is the
whole data position; a checkpoint records each stream's state (``reader_state``)
and a resume seeks to it.

A single process standing in for W ranks (``simulate_ranks``) builds the same W
partitions as streams and accumulates one micro-batch from each: it sees exactly
what W workers see. Online randomness (stochastic item reordering, masked
prompting) is seeded by (seed, epoch, global document index), so it does not
depend on which rank holds a document.
"""

from __future__ import annotations

import math

import numpy as np

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.shards import partition_parts
from cllm4rec_dist.corpus.stream import PartitionReader
from cllm4rec_dist.model.batch import LMBatch, RecBatch
from cllm4rec_dist.recommenders.cllm4rec.prompts import arrange_items, doc_rng, rec_prompt
from cllm4rec_dist.train.settings import BatchSettings


def partition_sizes(entry: dict, world: int) -> list[int]:
    """Documents per rank for a corpus's manifest entry (no shard is read)."""
    return [sum(p.count for p in partition_parts(entry, r, world)) for r in range(world)]


def read_partition(data, corpus: str, rank: int, world: int) -> tuple[list[dict], np.ndarray]:
    """(documents, their global indices) of ``rank``'s part of ``corpus`` in a ShardedDataset, in manifest order."""
    reader = PartitionReader(data, corpus, rank, world, buffer_docs=0, key=[0, 0, rank])
    return [doc for _, doc in reader.documents()], reader.global_indices(np.arange(reader.size))


class CorpusBatches:
    """Deterministic batches of one rank's partition of a corpus ('collab', 'content' or 'rec')."""

    def __init__(self, name: str, reader: PartitionReader, space: TokenSpace, settings: BatchSettings,
                 steps_per_epoch: int):
        if not reader.size:
            raise ValueError(f"corpus {name}: this rank's partition is empty")
        self.name, self.reader, self.space, self.s = name, reader, space, settings
        self.steps_per_epoch = steps_per_epoch

    @staticmethod
    def corpus_seed(name: str) -> int:
        return sum(ord(c) for c in name)

    @classmethod
    def for_rank(cls, data, name: str, space: TokenSpace, settings: BatchSettings, rank: int = 0,
                 world: int = 1) -> CorpusBatches:
        """Rank ``rank``'s batches; its shards are read (and verified) once here, kept only in the in-memory case."""
        entry = data.corpus_entry(name)
        sizes = partition_sizes(entry, world)
        if min(sizes) == 0:
            raise ValueError(f"corpus {name} has {entry['num_docs']} documents, too few for {world} ranks")
        steps = max(math.ceil(n / settings.batch_size) for n in sizes)
        reader = PartitionReader(data, name, rank, world, settings.shuffle_buffer,
                                 key=[settings.seed, cls.corpus_seed(name), rank])
        return cls(name, reader.verify(), space, settings, steps)

    def _docs(self, epoch: int, step: int) -> list[tuple[int, dict]]:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"{self.name}: step {step} outside 0..{self.steps_per_epoch - 1}")
        return self.reader.take(epoch, step * self.s.batch_size, self.s.batch_size)

    def doc_positions(self, epoch: int, step: int) -> np.ndarray:
        """Positions (in this partition) of the documents of batch (epoch, step)."""
        return np.array([position for position, _ in self._docs(epoch, step)], dtype=np.int64)

    def batch(self, epoch: int, step: int) -> LMBatch | RecBatch:
        pairs = self._docs(epoch, step)
        docs = [doc for _, doc in pairs]
        ids = self.reader.global_indices(np.array([p for p, _ in pairs], dtype=np.int64)).tolist()
        if self.name == "rec":
            return self._rec_batch(docs, ids, epoch)
        return self._lm_batch(docs, ids, epoch)

    def reader_state(self, epoch: int, step: int) -> dict:
        """The stream's state before batch (epoch, step), for a checkpoint."""
        return self.reader.state(epoch, step * self.s.batch_size)

    def restore_reader(self, saved: dict, epoch: int, step: int) -> str | None:
        """Seek the stream to batch (epoch, step) and check it against ``saved`` (``reader_state`` of the run
        that wrote the checkpoint). Returns why the saved state does not apply (another buffer, seed, world or
        data: the position is then re-derived from (epoch, step) alone), or None; a state that applies but is
        not reproduced is an error (the order would differ from the uninterrupted run's)."""
        mine = self.reader.identity()
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
        self.reader.seek(epoch, step * self.s.batch_size)
        if changed:
            return f"{self.name} stream {self.reader.rank}: {', '.join(changed)}"
        now = self.reader_state(epoch, step)
        if now != saved:
            diff = [f"{k} {saved.get(k)!r} (saved) vs {v!r}" for k, v in now.items() if saved.get(k) != v]
            raise ValueError(f"{self.name} stream {self.reader.rank}: the data position of the checkpoint is not "
                             f"reproduced ({'; '.join(diff)}); the shards or the reader changed.")
        return None

    def _items(self, items: list[int], epoch: int, doc: int, budget: int) -> list[int]:
        """Reorder (or keep) a user's items and fit them into ``budget`` tokens (prompts.py)."""
        order = doc_rng(self.s.seed, epoch, doc, "order") if self.s.reorder else None
        return arrange_items(items, budget, order)

    def _lm_batch(self, docs: list[dict], ids: list[int], epoch: int) -> LMBatch:
        rows, prompt_lengths = [], []
        for doc, doc_id in zip(docs, ids):
            prompt, main = doc["prompt"], doc["main"]
            budget = self.s.max_length - len(prompt)
            if doc["kind"] == "collab":  # MAIN is a set of items: reorder online
                main = self._items(main, epoch, doc_id, budget)
            else:
                main = main[:budget]
            rows.append(prompt + main)
            prompt_lengths.append(len(prompt))
        return LMBatch.from_rows(rows, prompt_lengths, pack=self.s.pack)

    def _rec_batch(self, docs: list[dict], ids: list[int], epoch: int) -> RecBatch:
        rows, users, target_rows, target_items = [], [], [], []
        for row, (doc, doc_id) in enumerate(zip(docs, ids)):
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

