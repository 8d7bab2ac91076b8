"""Stored evaluation candidates for the leave-one-out split: the positive plus sampled negatives.

A-LLMRec's protocol (and the sequential-recommendation literature it follows) ranks, for every
validation / test user, the held-out item among ``num_negatives`` (19) items the user never
interacted with. Sampling them ONCE here, with a fixed seed, and storing them with the dataset
means every model (CF models, most-popular, the LLMs) is scored on exactly the same candidates.

"Never interacted with" is checked against every (user, item) pair the reader returned, before
binarisation: an item the user rated low is still an item the user knows, so it is never a
negative. The candidates of a part are drawn with ``np.random.default_rng([seed, user, part])``
and shuffled with the same generator: the positive's position is random, not always first.

``candidate_problem`` is the one rule a stored candidate row must follow, checked where the rows are drawn
(``sample_candidates``), where they are written and where they are read back (``corpus/sequences.py``): a list of
the same length for every user (the positive + ``num_negatives``), of distinct item ids in range, holding the
held-out item exactly once and no other item the user interacted with.
"""

from __future__ import annotations

import numpy as np

from cllm4rec_dist.data.records import InputError

PARTS = ("valid", "test")


def sample_negatives(rng: np.random.Generator, num_items: int, excluded: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct item indices in ``0..num_items-1`` outside the sorted array ``excluded``."""
    allowed = num_items - len(excluded)
    if allowed < n:
        raise ValueError(f"only {allowed} items are allowed, {n} needed")
    if len(excluded) * 2 > num_items:  # dense user: draw from the complement directly
        return rng.choice(np.setdiff1d(np.arange(num_items), excluded), size=n, replace=False)
    seen = set(excluded.tolist())
    chosen: list[int] = []
    while len(chosen) < n:  # rejection sampling: at least half of the catalogue is allowed
        for item in rng.integers(num_items, size=2 * (n - len(chosen)) + 4).tolist():
            if item not in seen:
                seen.add(item)
                chosen.append(item)
                if len(chosen) == n:
                    break
    return np.asarray(chosen, dtype=np.int64)


def _is_id(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def candidate_problem(row, positive: int, known, num_items: int, length: int | None = None) -> str | None:
    """What is wrong with one candidate row, or None when it follows the rule of the module docstring.

    ``row``: the candidates (list or int array); ``positive``: the held-out item it must hold exactly once;
    ``known``: an iterable of the items the user interacted with (the positive may be among them), none of which
    may be a negative; ``length``: the row length every user has (None: not checked). The answer completes a
    sentence that begins with the field's name, e.g. "test_candidates repeats item 7". The common (valid) case
    runs in C: a streaming reader checks every row of a large dataset.
    """
    if isinstance(row, np.ndarray):
        row = row.tolist()
    if not isinstance(row, (list, tuple)):
        return f"is a {type(row).__name__}, not a list of item ids"
    if row and set(map(type, row)) != {int}:
        wrong = [v for v in row if not _is_id(v)]
        if wrong:
            return f"holds {wrong[0]!r}, not an integer item id"
        row = [int(v) for v in row]  # numpy integers
    if row and (min(row) < 0 or max(row) >= num_items):
        outside = next(v for v in row if not 0 <= v < num_items)
        return f"holds item {outside}, outside the catalogue [0, {num_items})"
    if length is not None and len(row) != length:
        return (f"has {len(row)} candidates where every row has {length} (the held-out item and the same number of "
                "sampled negatives)")
    times = row.count(positive)
    if times != 1:
        return f"holds the held-out item {positive} {times} times; a row has exactly one positive"
    negatives = set(row)
    if len(negatives) != len(row):
        seen: set[int] = set()
        repeated = next(v for v in row if v in seen or seen.add(v))
        return f"repeats item {repeated}; the negatives are distinct"
    negatives.discard(positive)
    if not negatives.isdisjoint(known):
        leaked = next(v for v in row if v != positive and v in set(known))
        return (f"holds item {leaked} as a negative, but the user interacted with it (its history or another "
                "held-out item); negatives are items the user never interacted with")
    return None


def sample_candidates(split, interacted: list[np.ndarray], num_negatives: int, seed: int,
                      dataset: str = "dataset") -> dict[str, list[np.ndarray | None]]:
    """``{"valid": [...], "test": [...]}``: per user the candidates array, or None when the part is empty.

    ``split`` is a ``Split`` whose valid/test hold at most one item per user (leave-one-out);
    ``interacted[u]`` is the sorted array of every item index user ``u`` ever interacted with.
    """
    out: dict[str, list[np.ndarray | None]] = {part: [] for part in PARTS}
    for u in range(split.num_users):
        known: set[int] | None = None
        for part_index, part in enumerate(PARTS):
            held_out = getattr(split, part)[u]
            if len(held_out) == 0:
                out[part].append(None)
                continue
            if len(held_out) != 1:
                raise ValueError(f"user {u}: {len(held_out)} {part} items; candidates need one (leave-one-out)")
            rng = np.random.default_rng([seed, u, part_index])
            try:
                negatives = sample_negatives(rng, split.num_items, interacted[u], num_negatives)
            except ValueError:
                raise InputError(
                    f"{dataset}: user {split.user_ids[u]!r} interacted with {len(interacted[u])} of "
                    f"{split.num_items} items, leaving fewer than --num-negatives {num_negatives} "
                    "items to sample; lower --num-negatives or filter such users out."
                ) from None
            candidates = np.concatenate([held_out.astype(np.int64), negatives])
            candidates = candidates[rng.permutation(len(candidates))]
            known = set(interacted[u].tolist()) if known is None else known
            problem = candidate_problem(candidates, int(held_out[0]), known, split.num_items,
                                        num_negatives + 1)
            if problem is not None:  # a sampling bug: refuse it before anything is written
                raise InputError(f"{dataset}: user {split.user_ids[u]!r}: the drawn {part}_candidates {problem}. "
                                 "Nothing was written; this is a bug of the candidate sampling (data/candidates.py), "
                                 "please report it with the command line.")
            out[part].append(candidates)
    return out
