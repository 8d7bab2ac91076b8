"""Hit@K and NDCG@K on the stored candidates (leave-one-out), overall and on warm/cold slices.

Every model evaluated on a leave-one-out dataset (the CF models, most-popular, A-LLMRec's scored
and generated answers, the titles-only LLM) goes through this module, on the candidates stored
at preprocessing, so the numbers are comparable by construction.

* Each evaluated user has one positive among C candidates (1 + 19 by default). Its 0-based rank
  is the number of candidates scored higher, plus the number scored EQUAL that come earlier in
  the stored candidate order. That order is a seeded random permutation, so ties are broken at
  random, yet reproducibly (most-popular has many ties; lower-index-first would be biased).
* Hit@K = 1 if rank < K; NDCG@K = 1 / log2(rank + 2) if rank < K, else 0 (one relevant item,
  so IDCG = 1). A model that gives no answer (a generated title naming no candidate) has rank
  ``MISS`` and counts as a miss at every K.
* Slices (thresholds are ``CandidateEvalSettings`` fields): ``cold_items``: the positive has at
  most ``cold_item_max_count`` training interactions; ``warm_items``: at least
  ``warm_item_min_count``; ``cold_users``: the user's history (the items before the positive)
  has at most ``cold_user_max_history`` items.
* For data-parallel evaluation ``rank_sums`` gives per-slice sums and user counts; ranks add them
  with ``merge_sums`` (or an all-reduce of the same numbers) and ``finalize`` divides once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MISS = np.inf
"""Rank of a positive the model did not name (generation answered no candidate): a miss at every K."""


@dataclass
class CandidateEvalSettings:
    """Metric cut-offs and the thresholds that define the warm / cold slices."""

    hit_ks: tuple[int, ...] = (1, 5, 10)
    """Cut-offs K of Hit@K (A-LLMRec reports Hit@1)."""
    ndcg_ks: tuple[int, ...] = (5, 10)
    """Cut-offs K of NDCG@K."""
    cold_item_max_count: int = 10
    """An item with at most this many TRAINING interactions is cold (ML-100K leave-one-out: ~9% of test positives)."""
    warm_item_min_count: int = 50
    """An item with at least this many training interactions is warm (ML-100K leave-one-out: ~63% of test positives)."""
    cold_user_max_history: int = 10
    """A user whose history before the positive has at most this many items is cold (ML-100K: ~11% of users)."""

    def validate(self) -> CandidateEvalSettings:
        if not self.hit_ks or not self.ndcg_ks or min(self.hit_ks + self.ndcg_ks) < 1:
            raise ValueError("candidate metrics: hit_ks and ndcg_ks must be non-empty lists of K >= 1")
        if self.cold_item_max_count >= self.warm_item_min_count:
            raise ValueError("cold_item_max_count must be below warm_item_min_count (the slices must not overlap)")
        return self


def metric_names(settings: CandidateEvalSettings) -> list[str]:
    return [f"hit@{k}" for k in settings.hit_ks] + [f"ndcg@{k}" for k in settings.ndcg_ks]


def positive_ranks(scores, candidates, positives) -> np.ndarray:
    """0-based rank of each row's positive among its candidates (ties: earlier candidate first).

    ``scores`` and ``candidates`` are ``[U, C]``; ``positives`` is ``[U]`` and must occur in its row.
    """
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.asarray(candidates)
    is_positive = candidates == np.asarray(positives)[:, None]
    if not is_positive.any(1).all():
        raise ValueError("a positive is missing from its candidate row")
    where = is_positive.argmax(1)
    mine = scores[np.arange(len(scores)), where][:, None]
    earlier = np.arange(candidates.shape[1])[None, :] < where[:, None]
    return ((scores > mine) | ((scores == mine) & earlier)).sum(1).astype(np.float64)


def slice_masks(positives, history_lengths, train_counts, settings: CandidateEvalSettings) -> dict[str, np.ndarray]:
    """Boolean row masks of the slices (see the module docstring)."""
    counts = np.asarray(train_counts)[np.asarray(positives, dtype=np.int64)]
    history_lengths = np.asarray(history_lengths)
    return {
        "cold_items": counts <= settings.cold_item_max_count,
        "warm_items": counts >= settings.warm_item_min_count,
        "cold_users": history_lengths <= settings.cold_user_max_history,
    }


def _per_user(ranks: np.ndarray, settings: CandidateEvalSettings) -> dict[str, np.ndarray]:
    values = {f"hit@{k}": (ranks < k).astype(np.float64) for k in settings.hit_ks}
    for k in settings.ndcg_ks:
        gain = np.zeros(len(ranks))
        hit = ranks < k
        gain[hit] = 1.0 / np.log2(ranks[hit] + 2)
        values[f"ndcg@{k}"] = gain
    return values


def rank_sums(ranks, slices: dict[str, np.ndarray], settings: CandidateEvalSettings) -> dict[str, dict[str, float]]:
    """``{"all" | slice: {"users": n, metric: sum}}``: what ranks add up before dividing."""
    ranks = np.asarray(ranks, dtype=np.float64)
    values = _per_user(ranks, settings)
    out = {}
    for name, mask in {"all": np.ones(len(ranks), bool), **slices}.items():
        out[name] = {"users": int(mask.sum()), **{m: float(v[mask].sum()) for m, v in values.items()}}
    return out


def merge_sums(a: dict, b: dict) -> dict:
    """The sums of two disjoint sets of users."""
    return {name: {key: a[name][key] + b[name][key] for key in a[name]} for name in a}


def finalize(sums: dict) -> dict:
    """Means from sums: ``{"users": n, metric: mean, ..., "slices": {name: {"users": n, metric: mean}}}``.

    A metric over zero users is None (a slice can be empty).
    """
    def means(entry):
        n = entry["users"]
        return {"users": n, **{k: (v / n if n else None) for k, v in entry.items() if k != "users"}}

    result = means(sums["all"])
    result["slices"] = {name: means(entry) for name, entry in sums.items() if name != "all"}
    return result


def candidate_metrics(ranks_or_scores, candidates, positives, history_lengths, train_counts,
                      settings: CandidateEvalSettings | None = None, *, are_ranks: bool = False) -> dict:
    """Hit@K / NDCG@K overall and per slice for one part (valid or test), in one dict.

    ``ranks_or_scores`` is the ``[U, C]`` score matrix aligned with ``candidates`` or, with
    ``are_ranks=True``, the ``[U]`` ranks already known (e.g. 0 for a generated answer naming the
    positive, ``MISS`` for one naming no candidate, the rank of the named candidate otherwise).
    """
    settings = (settings or CandidateEvalSettings()).validate()
    ranks = np.asarray(ranks_or_scores, dtype=np.float64) if are_ranks else \
        positive_ranks(ranks_or_scores, candidates, positives)
    slices = slice_masks(positives, history_lengths, train_counts, settings)
    return finalize(rank_sums(ranks, slices, settings))


def evaluate_part(score: Callable[[np.ndarray, list[list[int]], np.ndarray], np.ndarray], data, part: str,
                  settings: CandidateEvalSettings | None = None) -> dict:
    """``candidate_metrics`` of a model on ``part`` of a ``SequentialData``.

    ``score(users, prefixes, candidates)`` returns the ``[U, C]`` scores of each user's candidates
    after its prefix (the history for valid; history + valid item for test).
    """
    users, prefixes, candidates, positives = data.evaluation_rows(part)
    scores = np.asarray(score(users, prefixes, candidates), dtype=np.float64).reshape(candidates.shape)
    return candidate_metrics(scores, candidates, positives, [len(p) for p in prefixes], data.train_counts, settings)
