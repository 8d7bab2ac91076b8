"""Top-K ranking and Recall@K / NDCG@K, computed as the CLLM4Rec reference code does (spec §12).

Every model in the project (CLLM4Rec and the baselines) is scored through this
module, so numbers are comparable by construction:

* ``rank_items`` turns a dense (users x items) score matrix into top-K item
  indices, with the user's known interactions excluded.
* ``recall_at_k`` / ``ndcg_at_k`` give per-user values; ``evaluate_topk`` gives
  the means that go into metrics.json.
* ``metric_sums`` + ``merge_sums`` / ``all_reduce_sums`` + ``finalize`` are the
  same computation split for data-parallel evaluation: each rank scores its own
  users, produces per-metric SUMS and user COUNTS, the ranks add them up, and
  only then is anything divided. (Averaging per-rank means would weight ranks,
  not users, whenever shards hold different numbers of evaluable users.)
* ``split_targets`` / ``evaluate_split`` fix which items are held out and which
  are excluded for the ``valid`` and ``test`` parts of an ``EvalSplit``.
* ``cold_slice_sums`` adds the cold-item slices (``COLD_SLICES``) to the sums as
  ``<slice>/<metric>`` keys; ``finalize`` divides each slice by its own user count.

Definitions (identical to the authors' ``Recall_at_k`` / ``NDCG_at_k``):

* Recall@K = |topK ∩ heldout| / min(K, |heldout|)
* NDCG@K   = DCG@K / IDCG@K, DCG = sum over hits at 0-based rank r of
  1/log2(r + 2), IDCG = the same sum over min(K, |heldout|) ideal hits.

Where this module deliberately differs from the reference code:

* Users with no held-out items are SKIPPED (the reference divides 0 by 0 and
  gets NaN) and counted in ``num_skipped``; means are over evaluated users.
* Ties are broken deterministically (lower item index first); the reference
  uses ``np.argpartition``, whose choice among tied scores is unspecified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from cllm4rec_dist.corpus.split import EvalSplit

PAD = -1
"""Item index used to pad a top-K row when a user has fewer than K rankable items; always a miss."""

DEFAULT_RECALL_KS: tuple[int, ...] = (20, 40)
DEFAULT_NDCG_KS: tuple[int, ...] = (100,)
COUNT_KEYS: tuple[str, str] = ("num_users", "num_skipped")
COLD_SLICES: tuple[str, str, str] = ("cold", "cold_only", "cold_only_random")
"""Slices of each user's held-out COLD items (items with no training interaction), over the users who have one:

* ``cold``: the ranking over ALL items, scored against the held-out cold items only. A model that lifts every
  cold item for every user does well here without knowing who likes which.
* ``cold_only``: only the cold items ranked, against the same held-out cold items: whether the scores tell which
  cold item suits whom.
* ``cold_only_random``: Recall@K a uniformly random order of those same candidates is expected to reach; a
  personal cold side is above it.

In the sums and the finalized metrics the keys are ``<slice>/<metric>``; the ``cold`` slice's user counts are
reported as ``num_cold_users`` / ``num_cold_skipped``."""

# Rows ranked at once inside rank_items: bounds the (rows x items) temporaries.
_RANK_CHUNK_ROWS = 512


# --------------------------------------------------------------------------- ranking


def _as_float_matrix(scores: Any) -> np.ndarray:
    """A 2-D float32/float64 numpy view of ``scores`` (numpy array or torch tensor)."""
    if hasattr(scores, "detach"):  # torch.Tensor, without importing torch here
        t = scores.detach()
        if str(t.dtype) not in ("torch.float32", "torch.float64"):
            t = t.float()
        scores = t.cpu().numpy()
    a = np.asarray(scores)
    if a.ndim != 2:
        raise ValueError(f"scores must be a 2-D (users x items) matrix, got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64 if a.dtype.itemsize > 4 else np.float32)
    return a


def combine_exclusions(*per_user: Sequence[np.ndarray] | None) -> list[np.ndarray] | None:
    """Union, per user, of several exclusion lists (e.g. train items and valid items)."""
    lists = [p for p in per_user if p is not None]
    if not lists:
        return None
    n = len(lists[0])
    if any(len(p) != n for p in lists):
        raise ValueError("exclusion lists must all have one entry per user")
    return [np.concatenate([np.asarray(p[u], dtype=np.int64).ravel() for p in lists]) for u in range(n)]


def rank_items(scores: Any, exclude: Sequence[np.ndarray] | None, k: int) -> np.ndarray:
    """Top-``k`` item indices per user, best first, shape (U, k), dtype int64.

    scores:  dense (U, J) matrix, numpy or torch (any device; moved to CPU).
    exclude: one int array per user of items that must never be recommended
             (the user's train items; plus valid items when scoring test, see
             ``split_targets``), or None. Use ``combine_exclusions`` to merge lists.

    Tie-breaking is deterministic: equal scores rank the LOWER item index first,
    so results do not depend on the sort algorithm or the number of threads.
    A non-excluded item is always rankable, even with a score of -inf (it ranks
    after every finite score). If a user has fewer than ``k`` rankable items the
    row is padded with ``PAD`` (-1), which the metrics count as a miss.
    NaN scores raise ``ValueError``: they mean the model diverged, and silently
    ranking them would hide it.
    """
    s_all = _as_float_matrix(scores)
    num_users, num_items = s_all.shape
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if exclude is not None and len(exclude) != num_users:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_users} users")
    out = np.full((num_users, k), PAD, dtype=np.int64)
    kk = min(k, num_items)
    if kk == 0 or num_users == 0:
        return out
    lowest = np.finfo(s_all.dtype).min
    for start in range(0, num_users, _RANK_CHUNK_ROWS):
        stop = min(start + _RANK_CHUNK_ROWS, num_users)
        n = stop - start
        if np.isnan(s_all[start:stop]).any():
            bad = start + int(np.nonzero(np.isnan(s_all[start:stop]).any(axis=1))[0][0])
            raise ValueError(f"scores contain NaN (first at user row {bad})")
        # Rankable -inf -> lowest finite value, so they still rank above excluded items (-inf).
        s = np.maximum(s_all[start:stop], lowest)
        if exclude is not None:
            ex = [np.asarray(exclude[u], dtype=np.int64).ravel() for u in range(start, stop)]
            lens = np.fromiter((len(e) for e in ex), dtype=np.int64, count=n)
            if lens.sum():
                s[np.repeat(np.arange(n), lens), np.concatenate(ex)] = -np.inf
        # v = the kk-th largest score per row. Everything strictly above v is in the
        # top-kk; the remaining slots go to the items equal to v with the lowest indices.
        if kk < num_items:
            v = -np.partition(-s, kk - 1, axis=1)[:, kk - 1]
        else:
            v = s.min(axis=1)
        greater = s > v[:, None]
        equal = s == v[:, None]
        need = kk - greater.sum(axis=1)
        chosen = greater | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))
        cols = np.nonzero(chosen)[1].reshape(n, kk)  # ascending item index within a row
        vals = np.take_along_axis(s, cols, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")  # stable: ties keep lower index first
        top = np.take_along_axis(cols, order, axis=1)
        top[np.take_along_axis(vals, order, axis=1) == -np.inf] = PAD
        out[start:stop, :kk] = top
    return out


# --------------------------------------------------------------------------- per-user metrics


class PerUser:
    """Per-user metric values plus which users were evaluated.

    ``values[u]`` is the metric for user u, and 0.0 (never NaN) for a skipped
    user (no held-out items); ``evaluated[u]`` says which. ``mean`` averages the
    evaluated users only and is None when there are none.
    """

    def __init__(self, values: np.ndarray, evaluated: np.ndarray):
        self.values = values
        self.evaluated = evaluated

    @property
    def num_users(self) -> int:
        return int(self.evaluated.sum())

    @property
    def num_skipped(self) -> int:
        return int((~self.evaluated).sum())

    @property
    def sum(self) -> float:
        return float(self.values[self.evaluated].sum())

    @property
    def mean(self) -> float | None:
        return self.sum / self.num_users if self.num_users else None

    def __repr__(self) -> str:
        return f"PerUser(mean={self.mean}, num_users={self.num_users}, num_skipped={self.num_skipped})"


def _hits(topk: Any, heldout: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, k) bool hit matrix of the first k ranked items, and the number of distinct held-out items per user."""
    top = np.asarray(topk)
    if top.ndim != 2:
        raise ValueError(f"topk must be a 2-D (users x ranked items) array, got shape {top.shape}")
    if top.shape[1] < k:
        raise ValueError(f"topk has {top.shape[1]} columns, fewer than k={k}; rank with k >= {k}")
    num_users = top.shape[0]
    if len(heldout) != num_users:
        raise ValueError(f"heldout has {len(heldout)} entries for {num_users} topk rows")
    top = top[:, :k].astype(np.int64, copy=False)
    if k > 1:
        srt = np.sort(top, axis=1)
        if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != PAD)).any():
            raise ValueError("topk rows must not repeat an item")
    held = [np.asarray(h, dtype=np.int64).ravel() for h in heldout]
    lens = np.fromiter((len(h) for h in held), dtype=np.int64, count=num_users)
    flat = np.concatenate(held) if lens.sum() else np.zeros(0, dtype=np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError("held-out item indices must be >= 0")
    # Encode (user, item) pairs as one int64 key so membership is one vectorised isin.
    width = int(max(top.max(initial=0), flat.max(initial=0))) + 1
    held_keys = np.unique(np.repeat(np.arange(num_users, dtype=np.int64), lens) * width + flat)
    n_held = np.bincount(held_keys // width, minlength=num_users)
    top_keys = np.arange(num_users, dtype=np.int64)[:, None] * width + top
    hits = np.isin(top_keys, held_keys) & (top != PAD)
    return hits, n_held


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _recall(hits: np.ndarray, n_held: np.ndarray, k: int) -> PerUser:
    evaluated = n_held > 0
    values = np.zeros(len(n_held), dtype=np.float64)
    values[evaluated] = hits[evaluated, :k].sum(axis=1) / np.minimum(k, n_held[evaluated])
    return PerUser(values, evaluated)


def _ndcg(hits: np.ndarray, n_held: np.ndarray, k: int) -> PerUser:
    evaluated = n_held > 0
    w = _discounts(k)
    idcg = np.cumsum(w)[np.minimum(k, n_held[evaluated]) - 1]
    values = np.zeros(len(n_held), dtype=np.float64)
    values[evaluated] = (hits[evaluated, :k] * w).sum(axis=1) / idcg
    return PerUser(values, evaluated)


def recall_at_k(topk: Any, heldout: Sequence[np.ndarray], k: int) -> PerUser:
    """Recall@k per user: |top-k ∩ heldout| / min(k, |heldout|). ``PAD`` entries are misses."""
    hits, n_held = _hits(topk, heldout, k)
    return _recall(hits, n_held, k)


def ndcg_at_k(topk: Any, heldout: Sequence[np.ndarray], k: int) -> PerUser:
    """NDCG@k per user with binary relevance; IDCG over min(k, |heldout|) ideal hits."""
    hits, n_held = _hits(topk, heldout, k)
    return _ndcg(hits, n_held, k)


# --------------------------------------------------------------------------- sums, counts, means


def metric_sums(
    topk: Any,
    heldout: Sequence[np.ndarray],
    ks: Sequence[int] = DEFAULT_RECALL_KS,
    ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS,
) -> dict[str, float]:
    """Per-metric SUMS over evaluated users plus the counts ``num_users`` / ``num_skipped``.

    The distributed recipe: every rank calls this on its own users, the ranks add
    the dicts key by key (``all_reduce_sums``, or ``merge_sums`` in one process),
    and ``finalize`` divides by the total ``num_users``. The result equals
    ``evaluate_topk`` on all users at once, however the users were sharded.
    """
    kmax = max([*ks, *ndcg_ks], default=0)
    hits, n_held = _hits(topk, heldout, kmax)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = _recall(hits, n_held, k).sum
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = _ndcg(hits, n_held, k).sum
    out["num_users"] = float((n_held > 0).sum())
    out["num_skipped"] = float((n_held == 0).sum())
    return out


def random_recall_sums(num_candidates: np.ndarray, num_heldout: np.ndarray,
                       ks: Sequence[int] = DEFAULT_RECALL_KS) -> dict[str, float]:
    """``metric_sums``' Recall@K sums (and counts) EXPECTED from a uniformly random order of each user's
    ``num_candidates`` rankable items, ``num_heldout`` of them held out: the floor a ranking that knows nothing
    about the user reaches. Expected hits in the top K are ``h * min(K, n) / n``, so the expected Recall@K is
    that over ``min(K, h)``."""
    n = np.asarray(num_candidates, dtype=np.float64)
    h = np.asarray(num_heldout, dtype=np.float64)
    scored = h > 0
    out: dict[str, float] = {}
    for k in ks:
        hits = h[scored] * np.minimum(k, n[scored]) / np.maximum(n[scored], 1.0)
        out[f"recall@{k}"] = float((hits / np.minimum(k, h[scored])).sum())
    out["num_users"] = float(scored.sum())
    out["num_skipped"] = float((~scored).sum())
    return out


def cold_slice_sums(
    topk: Any,
    cold_topk: Any,
    heldout: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray],
    cold: np.ndarray,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
    ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS,
) -> dict[str, float]:
    """The ``COLD_SLICES`` sums of one batch of users, keyed ``<slice>/<metric>`` (merge them with the overall sums).

    ``topk``: the ranking over all items; ``cold_topk``: the ranking of the cold items alone (the warm items
    excluded as well as ``exclude``); ``heldout`` / ``exclude``: each user's held-out and excluded items;
    ``cold``: a boolean mask over the catalogue. Empty inputs give the zero sums a rank with no users adds.
    """
    cold = np.asarray(cold, dtype=bool)
    heldout_cold = [h[cold[h]] for h in (np.asarray(h, dtype=np.int64) for h in heldout)]
    num_cold = int(cold.sum())
    candidates = np.asarray([num_cold - int(cold[np.unique(np.asarray(e, dtype=np.int64))].sum()) for e in exclude],
                            dtype=np.int64)
    kmax = max([*ks, *ndcg_ks], default=0)
    if not len(heldout_cold):
        topk = cold_topk = np.zeros((0, kmax), dtype=np.int64)
    out: dict[str, float] = {}
    for name, sums in (("cold", metric_sums(topk, heldout_cold, ks, ndcg_ks)),
                       ("cold_only", metric_sums(cold_topk, heldout_cold, ks, ndcg_ks)),
                       ("cold_only_random", random_recall_sums(candidates, np.asarray([len(h) for h in heldout_cold]),
                                                               ks))):
        out.update({f"{name}/{key}": value for key, value in sums.items()})
    return out


def merge_sums(*sums: Mapping[str, float]) -> dict[str, float]:
    """Key-wise addition of ``metric_sums`` outputs (the single-process all-reduce)."""
    if not sums:
        raise ValueError("merge_sums needs at least one input")
    keys = set(sums[0])
    if any(set(s) != keys for s in sums):
        raise ValueError("cannot merge metric sums computed with different metrics")
    return {key: float(sum(s[key] for s in sums)) for key in sums[0]}


def all_reduce_sums(sums: Mapping[str, float], group: Any = None) -> dict[str, float]:
    """Sum ``metric_sums`` across torch.distributed ranks (identity when not distributed).

    Keys are reduced in sorted order, so every rank must have computed the same
    metrics. The tensor goes to the current CUDA device under NCCL, else CPU.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(sums)
    keys = sorted(sums)
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
              else torch.device("cpu"))
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, t.tolist()))


def finalize(sums: Mapping[str, float]) -> dict[str, Any]:
    """Means from (merged) sums: each metric / num_users; counts as ints.

    A slice key ``<slice>/<metric>`` (``cold_slice_sums``) is divided by its own slice's ``<slice>/num_users``;
    of the slices' counts only the ``cold`` slice's are kept, as ``num_cold_users`` / ``num_cold_skipped``.
    A metric is None when no user was evaluated (undefined, and None survives JSON).
    """
    out: dict[str, Any] = {}
    for key, value in sums.items():
        prefix, _, name = key.rpartition("/")
        if name in COUNT_KEYS:
            if not prefix:
                out[key] = int(round(value))
            elif prefix == "cold":
                out[f"num_cold_{name[len('num_'):]}"] = int(round(value))
            continue
        n = int(round(sums[f"{prefix}/num_users" if prefix else "num_users"]))
        out[key] = float(value) / n if n else None
    return out


def evaluate_topk(
    topk: Any,
    heldout: Sequence[np.ndarray],
    ks: Sequence[int] = DEFAULT_RECALL_KS,
    ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS,
) -> dict[str, Any]:
    """{"recall@20": mean, "recall@40": mean, "ndcg@100": mean, "num_users": n, "num_skipped": m}."""
    return finalize(metric_sums(topk, heldout, ks, ndcg_ks))


# --------------------------------------------------------------------------- models on an EvalSplit


def split_targets(
    split: EvalSplit, part: str, exclude_valid_on_test: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(held-out items, items to exclude from the ranking) for ``part`` in {"valid", "test"}.

    valid: held out = valid items; excluded = train items.
    test:  held out = test items; excluded = train items, plus the valid items
           when ``exclude_valid_on_test`` (the default). Valid items are known
           interactions by test time, so recommending them is neither useful nor
           a fair miss. The authors' predict.py masks train items only; pass
           False to reproduce that exactly. Every model in this project uses the
           same convention, whichever is chosen.
    Model inputs are unaffected: every model scores from the TRAIN items only.
    """
    if part == "valid":
        return list(split.valid), list(split.train)
    if part == "test":
        exclude = combine_exclusions(split.train, split.valid) if exclude_valid_on_test else list(split.train)
        return list(split.test), exclude
    raise ValueError(f"part must be 'valid' or 'test', got {part!r}")


def split_metric_sums(
    score_fn: Callable[[np.ndarray], Any],
    split: EvalSplit,
    part: str,
    *,
    users: np.ndarray | None = None,
    exclude_valid_on_test: bool = True,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
    ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS,
    batch_users: int = 1024,
) -> dict[str, float]:
    """``metric_sums`` for a model on ``users`` (default: all) of ``split``'s ``part``.

    ``score_fn(user_indices) -> (len(user_indices), num_items)`` scores (numpy or
    torch). Users are scored ``batch_users`` at a time, so memory is bounded by
    one batch of scores, not by users x items. Give each rank its own ``users``
    and combine the results with ``all_reduce_sums`` before ``finalize``.
    A split with cold items (``EvalSplit.cold_items``) adds the ``COLD_SLICES``.
    """
    heldout, exclude = split_targets(split, part, exclude_valid_on_test)
    users = np.arange(split.num_users) if users is None else np.asarray(users, dtype=np.int64)
    kmax = max([*ks, *ndcg_ks])
    cold = split.cold_mask()
    warm = np.flatnonzero(~cold)
    parts = []
    for start in range(0, len(users), max(1, batch_users)):
        batch = users[start : start + batch_users]
        scores = score_fn(batch)
        shape = tuple(scores.shape)
        if shape != (len(batch), split.num_items):
            raise ValueError(f"score_fn returned shape {shape}, expected {(len(batch), split.num_items)}")
        batch_exclude, batch_heldout = [exclude[u] for u in batch], [heldout[u] for u in batch]
        topk = rank_items(scores, batch_exclude, kmax)
        sums = metric_sums(topk, batch_heldout, ks, ndcg_ks)
        if cold.any():
            cold_topk = rank_items(scores, [np.concatenate([e, warm]) for e in batch_exclude], kmax)
            sums.update(cold_slice_sums(topk, cold_topk, batch_heldout, batch_exclude, cold, ks, ndcg_ks))
        parts.append(sums)
    if not parts:
        sums = metric_sums(np.zeros((0, kmax), dtype=np.int64), [], ks, ndcg_ks)
        if cold.any():
            sums.update(cold_slice_sums([], [], [], [], cold, ks, ndcg_ks))
        return sums
    return merge_sums(*parts)


def evaluate_split(
    score_fn: Callable[[np.ndarray], Any],
    split: EvalSplit,
    part: str,
    *,
    exclude_valid_on_test: bool = True,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
    ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS,
    batch_users: int = 1024,
) -> dict[str, Any]:
    """Single-process ``finalize(split_metric_sums(...))`` over all users."""
    return finalize(
        split_metric_sums(
            score_fn, split, part, exclude_valid_on_test=exclude_valid_on_test, ks=ks, ndcg_ks=ndcg_ks,
            batch_users=batch_users,
        )
    )


# ---- model selection --------------------------------------------------------------------------------

SELECTION_METRICS: dict[str, tuple[str, ...]] = {
    "recall@20": ("recall@20",),
    "authors": ("recall@20", "recall@40", "ndcg@100"),  # the authors' code selects on their sum
}


def selection_score(metrics: Mapping[str, Any], select_on: str) -> float:
    """The validation score a run keeps its best model by: the sum of ``SELECTION_METRICS[select_on]``
    (a metric that could not be computed, None, counts 0)."""
    if select_on not in SELECTION_METRICS:
        raise ValueError(f"select_on={select_on!r}; choose one of {', '.join(SELECTION_METRICS)}")
    return float(sum(metrics.get(name) or 0.0 for name in SELECTION_METRICS[select_on]))
