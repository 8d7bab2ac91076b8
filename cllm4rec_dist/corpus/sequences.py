"""The sequential view of a dataset: per-user time-ordered histories, held-out items, candidates, item texts.

Written at preprocessing (``cllm4rec preprocess --split leave-one-out``), read by every
sequential model (A-LLMRec's stage-0 CF models, its LLM stages, the candidate baselines):

* corpus ``seq``: one JSON document per user, in user order (document index = user index)::

    {"user": u, "history": [train items, oldest first], "valid": v | null, "test": t | null,
     "valid_candidates": [positive + negatives, seeded order] | null, "test_candidates": ... | null}

* ``items.json`` (written for both splits): ``{"titles": [J str], "descriptions": [J str],
  "train_counts": [J int]}``; an item without a title is shown by its original id
  (counted as ``items_without_title`` in stats.json), an item without a description has ''.

Both go through ``DatasetWriter`` (atomic, sha256 in the manifest) and are verified on read. Beyond the
checksums, every document is checked where it is written (``sequence_documents``) and where it is read
(``SequentialData.open``), before any model trains on it (``seq_document_problem``): the history a list of item
ids, ``valid`` / ``test`` an item id or null, candidates exactly where there is a held-out item, and each
candidate row as ``data/candidates.py`` draws it (``candidate_problem``: the same length for every user, distinct
ids in range, the held-out item once, no item of the user's train prefix or other held-out item). ``items.json``
must hold one title, description and train count per item. A bad file is one line naming the shard (or file),
the user row and the field.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np

from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError, partition_doc_ids
from cllm4rec_dist.data.candidates import candidate_problem
from cllm4rec_dist.data.protocol import Split
from cllm4rec_dist.data.records import InputError

SEQ_CORPUS = "seq"
ITEMS_FILE = "items.json"
PARTS = ("valid", "test")


def _single(items: np.ndarray, part: str, user: int) -> int | None:
    if len(items) > 1:
        raise ValueError(f"user {user}: {len(items)} {part} items; the seq corpus needs the leave-one-out split")
    return int(items[0]) if len(items) else None


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def candidates_length(protocol) -> int | None:
    """The candidate row length a protocol (a ``ProtocolConfig`` as a dict) draws: the positive + num_negatives."""
    negatives = protocol.get("num_negatives") if isinstance(protocol, dict) else None
    return negatives + 1 if _is_id(negatives) and negatives >= 1 else None


def seq_document_problem(doc: dict, num_items: int, length: int | None) -> tuple[str, str] | None:
    """(field, what is wrong) of a ``seq`` document, or None; see the module docstring for the rules.

    ``length``: the candidate row length every user has (None: not checked here)."""
    history = doc.get("history")
    if not isinstance(history, list) or (history and (set(map(type, history)) != {int} or min(history) < 0
                                                       or max(history) >= num_items)):
        return "history", f"is not a list of item ids in [0, {num_items})"
    held = {part: doc.get(part) for part in PARTS}
    for part, item in held.items():
        if item is not None and not (_is_id(item) and 0 <= item < num_items):
            return part, f"is {item!r}, not an item id in [0, {num_items}) or null"
    known = history + [item for item in held.values() if item is not None]
    for part, item in held.items():
        row = doc.get(f"{part}_candidates")
        if item is None or row is None:
            if item is not None or row is not None:
                return part, (f"is null but {part}_candidates is not" if item is None
                              else f"is item {item} but {part}_candidates is null (no candidates to rank it among)")
            continue
        prefix = history if part == "valid" or held["valid"] is None else history + [held["valid"]]
        if item in prefix:
            return part, f"is item {item}, which is also in the user's train prefix (history before it)"
        problem = candidate_problem(row, item, known, num_items, length)
        if problem is not None:
            return f"{part}_candidates", problem
    return None


def first_candidates_length(docs) -> int | None:
    """The length of the first stored candidate row (what every other row must have), or None when there is none."""
    for doc in docs:
        for part in PARTS:
            row = doc.get(f"{part}_candidates") if isinstance(doc, dict) else None
            if isinstance(row, list):
                return len(row)
    return None


def sequence_documents(split: Split):
    """The ``seq`` corpus of a leave-one-out Split, one document per user, each checked before it is written."""
    if not split.candidates:
        raise ValueError("the seq corpus needs a leave-one-out Split (with candidates)")
    length = candidates_length(split.stats.get("protocol"))
    for u in range(split.num_users):
        doc = {"user": u, "history": [int(i) for i in split.train[u]]}
        for part in PARTS:
            doc[part] = _single(getattr(split, part)[u], part, u)
            candidates = split.candidates[part][u]
            doc[f"{part}_candidates"] = None if candidates is None else [int(i) for i in candidates]
        length = length or first_candidates_length([doc])
        problem = seq_document_problem(doc, split.num_items, length)
        if problem is not None:
            raise InputError(f"user {split.user_ids[u]!r}: the {problem[0]} about to be written {problem[1]}; "
                             "the dataset was not finished (no manifest.json). This is a bug of the preprocessing, "
                             "please report it with the command line.")
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


def check_documents(data: ShardedDataset, docs: list[dict]) -> None:
    """Every ``seq`` document of ``data`` by ``seq_document_problem``; the first bad one is a ShardError naming its
    shard, the user row and the field."""
    length = candidates_length(data.manifest.get("protocol")) or first_candidates_length(docs)
    shards = data.corpus_entry(SEQ_CORPUS)["shards"]
    ends = np.cumsum([s["num_docs"] for s in shards])
    for u, doc in enumerate(docs):
        problem = seq_document_problem(doc, data.num_items, length)
        if problem is not None:
            shard = posixpath.join(data.root, shards[int(np.searchsorted(ends, u, side="right"))]["path"])
            raise ShardError(f"{shard}: user {u}: {problem[0]} {problem[1]}; the stored sequences or candidates were "
                             "edited or damaged, and scores on them would mean nothing. Re-run `cllm4rec preprocess "
                             "... --split leave-one-out` to write them again.")


def check_items_table(data: ShardedDataset, items) -> None:
    """``items.json``: one title (str), description (str) and train count (int >= 0) per item."""
    where = posixpath.join(data.root, ITEMS_FILE)

    def bad(what: str) -> ShardError:
        return ShardError(f"{where}: {what}; the file was edited or belongs to another dataset. Re-run "
                          "`cllm4rec preprocess ... --split leave-one-out`.")

    if not isinstance(items, dict):
        raise bad(f"holds a {type(items).__name__}, not an object with titles, descriptions and train_counts")
    for key, ok, kind in (("titles", lambda v: isinstance(v, str), "a string"),
                          ("descriptions", lambda v: isinstance(v, str), "a string"),
                          ("train_counts", lambda v: _is_id(v) and v >= 0, "a whole number >= 0")):
        values = items.get(key)
        if not isinstance(values, list) or len(values) != data.num_items:
            size = len(values) if isinstance(values, list) else type(values).__name__
            raise bad(f"{key} holds {size} entries, the dataset has num_items={data.num_items}")
        wrong = next((j for j, v in enumerate(values) if not ok(v)), None)
        if wrong is not None:
            raise bad(f"{key}[{wrong}] is {values[wrong]!r}, not {kind}")


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
        if [d.get("user") for d in docs] != list(range(data.num_users)):
            raise ShardError(f"{data.url}: the seq corpus is not one document per user in user order; "
                             "re-run `cllm4rec preprocess`.")
        check_documents(data, docs)
        items = data.read_json(ITEMS_FILE)
        check_items_table(data, items)
        return cls(
            num_users=data.num_users,
            num_items=data.num_items,
            histories=[d["history"] for d in docs],
            valid=[d.get("valid") for d in docs],
            test=[d.get("test") for d in docs],
            candidates={part: [d.get(f"{part}_candidates") for d in docs] for part in PARTS},
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
