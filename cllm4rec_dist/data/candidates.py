"""Stored evaluation candidates for the leave-one-out split: the positive plus sampled negatives.

A-LLMRec's protocol (and the sequential-recommendation literature it follows) ranks, for every
validation / test user, the held-out item among ``num_negatives`` (19) items the user never
interacted with. Sampling them ONCE here, with a fixed seed, and storing them with the dataset
means every model (CF models, most-popular, the LLMs) is scored on exactly the same candidates.

"Never interacted with" is checked against every (user, item) pair the reader returned, before
binarisation: an item the user rated low is still an item the user knows, so it is never a
negative. The candidates of a part are drawn with ``np.random.default_rng([seed, user, part])``
and shuffled with the same generator: the positive's position is random, not always first.
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


def sample_candidates(split, interacted: list[np.ndarray], num_negatives: int, seed: int,
                      dataset: str = "dataset") -> dict[str, list[np.ndarray | None]]:
    """``{"valid": [...], "test": [...]}``: per user the candidates array, or None when the part is empty.

    ``split`` is a ``Split`` whose valid/test hold at most one item per user (leave-one-out);
    ``interacted[u]`` is the sorted array of every item index user ``u`` ever interacted with.
    """
    out: dict[str, list[np.ndarray | None]] = {part: [] for part in PARTS}
    for u in range(split.num_users):
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
            out[part].append(candidates[rng.permutation(len(candidates))])
    return out
