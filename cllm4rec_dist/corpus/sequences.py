"""The sequential view of a dataset: per-user time-ordered histories, held-out items, candidates, item texts.

Written at preprocessing (``cllm4rec preprocess --split leave-one-out``), read by every
sequential model (A-LLMRec's stage-0 CF models, its LLM stages, the candidate baselines):

* corpus ``seq``: one JSON document per user, in user order (document index = user index)::

    {"user": u, "history": [train items, oldest first], "valid": v | null, "test": t | null,
     "valid_candidates": [positive + negatives, seeded order] | null, "test_candidates": ... | null}

* ``items.json`` (written for both splits): ``{"titles": [J str], "descriptions": [J str],
  "train_counts": [J int]}``; an item without a title is shown by its original id
  (counted as ``items_without_title`` in stats.json), an item without a description has ''.

Both go through ``DatasetWriter`` (atomic, sha256 in the manifest) and are verified on read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError, partition_doc_ids
from cllm4rec_dist.data.protocol import Split

SEQ_CORPUS = "seq"
ITEMS_FILE = "items.json"
PARTS = ("valid", "test")


def _single(items: np.ndarray, part: str, user: int) -> int | None:
    if len(items) > 1:
        raise ValueError(f"user {user}: {len(items)} {part} items; the seq corpus needs the leave-one-out split")
    return int(items[0]) if len(items) else None


def sequence_documents(split: Split):
    """The ``seq`` corpus of a leave-one-out Split, one document per user."""
    if not split.candidates:
        raise ValueError("the seq corpus needs a leave-one-out Split (with candidates)")
    for u in range(split.num_users):
        doc = {"user": u, "history": [int(i) for i in split.train[u]]}
        for part in PARTS:
            doc[part] = _single(getattr(split, part)[u], part, u)
            candidates = split.candidates[part][u]
            doc[f"{part}_candidates"] = None if candidates is None else [int(i) for i in candidates]
        yield doc


def sequence_length(doc: dict) -> int:
    """Items a seq document holds (history + held-out), the corpus's ``num_tokens`` in the manifest."""
    return len(doc["history"]) + sum(doc[part] is not None for part in PARTS)


def train_counts(split: Split) -> np.ndarray:
    """Training interactions per item (int64, length num_items)."""
    flat = np.concatenate(split.train) if split.num_users else np.zeros(0, np.int64)
    return np.bincount(flat.astype(np.int64), minlength=split.num_items)


def items_table(split: Split) -> dict:
    """The ``items.json`` object: titles (original id when missing), descriptions, train counts."""
    return {
        "titles": [split.item_titles.get(j) or split.item_ids[j] for j in range(split.num_items)],
        "descriptions": [split.item_texts.get(j, "") for j in range(split.num_items)],
        "train_counts": [int(c) for c in train_counts(split)],
    }


@dataclass
class SequentialData:
    """A leave-one-out dataset read back: everything indexed by contiguous user / item index.

    ``histories[u]`` are the train items oldest first; ``valid[u]`` / ``test[u]`` the held-out
    item or None (user not evaluated); ``candidates[part][u]`` the stored candidate list (the
    positive among them) or None.
    """

    num_users: int
    num_items: int
    histories: list[list[int]]
    valid: list[int | None]
    test: list[int | None]
    candidates: dict[str, list[list[int] | None]]
    titles: list[str]
    descriptions: list[str]
    train_counts: list[int]
    manifest: dict

    @classmethod
    def open(cls, data: str | ShardedDataset) -> SequentialData:
        """Read the ``seq`` corpus and ``items.json`` of a preprocessed dataset (a URL or a ShardedDataset)."""
        data = data if isinstance(data, ShardedDataset) else ShardedDataset(data)
        split = data.manifest.get("protocol", {}).get("split", "random")
        if SEQ_CORPUS not in data.manifest["corpora"]:
            raise ShardError(
                f"{data.url}: no sequential data (the dataset was preprocessed with --split {split}); "
                "re-run `cllm4rec preprocess ... --split leave-one-out`."
            )
        docs = data.read_corpus(SEQ_CORPUS)
        if [d["user"] for d in docs] != list(range(data.num_users)):
            raise ShardError(f"{data.url}: the seq corpus is not one document per user in user order; "
                             "re-run `cllm4rec preprocess`.")
        items = data.read_json(ITEMS_FILE)
        return cls(
            num_users=data.num_users,
            num_items=data.num_items,
            histories=[d["history"] for d in docs],
            valid=[d["valid"] for d in docs],
            test=[d["test"] for d in docs],
            candidates={part: [d[f"{part}_candidates"] for d in docs] for part in PARTS},
            titles=items["titles"],
            descriptions=items["descriptions"],
            train_counts=items["train_counts"],
            manifest=data.manifest,
        )

    def evaluated_users(self, part: str) -> np.ndarray:
        """Users with a ``part`` ("valid" / "test") item and candidates, ascending."""
        return np.asarray([u for u, c in enumerate(self.candidates[part]) if c is not None], dtype=np.int64)

    def evaluation_rows(self, part: str) -> tuple[np.ndarray, list[list[int]], np.ndarray, np.ndarray]:
        """(users, prefixes, candidates ``[U, C]``, positives ``[U]``) of the users evaluated on ``part``."""
        users = self.evaluated_users(part)
        candidates = np.asarray([self.candidates[part][u] for u in users], dtype=np.int64)
        positives = np.asarray([getattr(self, part)[u] for u in users], dtype=np.int64)
        return users, [self.prefix(int(u), part) for u in users], candidates.reshape(len(users), -1), positives

    def partition(self, rank: int, world: int) -> np.ndarray:
        """The users rank ``rank`` of ``world`` owns: the seq shards r, r+W, ... (the loader's rule)."""
        return partition_doc_ids(self.manifest["corpora"][SEQ_CORPUS], rank, world)

    def prefix(self, user: int, part: str) -> list[int]:
        """The items before ``part``'s held-out item: the history for valid, history + valid item for test."""
        if part == "valid":
            return list(self.histories[user])
        if part == "test":
            return list(self.histories[user]) + ([self.valid[user]] if self.valid[user] is not None else [])
        raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
