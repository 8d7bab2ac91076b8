"""Ranking and Recall/NDCG: hand-computed cases, ties, skipped users, and the sums/counts path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cllm4rec_dist.corpus.split import EvalSplit
from cllm4rec_dist.eval.metrics import (
    PAD,
    all_reduce_sums,
    combine_exclusions,
    evaluate_split,
    evaluate_topk,
    finalize,
    merge_sums,
    metric_sums,
    ndcg_at_k,
    rank_items,
    recall_at_k,
    split_metric_sums,
    split_targets,
)


def arr(*xs):
    return np.array(xs, dtype=np.int64)


# ----------------------------------------------------------------------------- metrics by hand


def test_recall_and_ndcg_hand_computed():
    topk = np.array([[0, 1, 2, 3]])
    heldout = [arr(1, 3, 5)]
    # k=2: one hit (item 1) out of min(2, 3) = 2.
    assert recall_at_k(topk, heldout, 2).mean == pytest.approx(0.5)
    # k=4: hits 1 and 3 out of min(4, 3) = 3.
    assert recall_at_k(topk, heldout, 4).mean == pytest.approx(2 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # hits at 0-based ranks 1 and 3
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # 3 ideal hits
    assert ndcg_at_k(topk, heldout, 4).mean == pytest.approx(dcg / idcg)
    # k=1: rank 0 is item 0, a miss.
    assert ndcg_at_k(topk, heldout, 1).mean == 0.0


def test_fewer_heldout_than_k_uses_min_in_denominator():
    topk = np.array([[5, 2, 7, 9]])
    heldout = [arr(2)]
    assert recall_at_k(topk, heldout, 4).mean == pytest.approx(1.0)
    assert ndcg_at_k(topk, heldout, 4).mean == pytest.approx((1 / math.log2(3)) / 1.0)
    # A perfect ranking has NDCG 1 even when |heldout| < K.
    assert ndcg_at_k(np.array([[2, 5, 7, 9]]), heldout, 4).mean == pytest.approx(1.0)


def test_users_without_heldout_are_skipped_and_counted_never_nan():
    topk = np.array([[0, 1], [0, 1], [1, 0]])
    heldout = [arr(0), arr(), arr(7)]
    r = recall_at_k(topk, heldout, 2)
    assert r.num_users == 2 and r.num_skipped == 1
    assert not np.isnan(r.values).any()
    assert r.values.tolist() == [1.0, 0.0, 0.0]
    assert r.mean == pytest.approx(0.5)
    out = evaluate_topk(topk, heldout, ks=(1, 2), ndcg_ks=(2,))
    assert out == {
        "recall@1": pytest.approx(0.5),
        "recall@2": pytest.approx(0.5),
        "ndcg@2": pytest.approx(0.5),
        "num_users": 2,
        "num_skipped": 1,
    }


def test_no_evaluable_users_gives_none_not_nan():
    out = evaluate_topk(np.array([[0, 1]]), [arr()], ks=(2,), ndcg_ks=(2,))
    assert out == {"recall@2": None, "ndcg@2": None, "num_users": 0, "num_skipped": 1}


def test_pad_is_a_miss_and_duplicate_heldout_counted_once():
    topk = np.array([[3, PAD, PAD]])
    assert recall_at_k(topk, [arr(3, 3, 4)], 3).mean == pytest.approx(0.5)  # |heldout| = 2
    assert recall_at_k(np.array([[PAD, PAD]]), [arr(0)], 2).mean == 0.0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="fewer than k"):
        recall_at_k(np.array([[0, 1]]), [arr(0)], 3)
    with pytest.raises(ValueError, match="repeat"):
        recall_at_k(np.array([[0, 0]]), [arr(0)], 2)
    with pytest.raises(ValueError, match="entries"):
        recall_at_k(np.array([[0, 1]]), [arr(0), arr(1)], 2)


def reference_metrics(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> tuple[float, float]:
    """Mean Recall@k / NDCG@k in the dense form the authors' util.py uses (no ties, no empty users)."""
    n = y_pred.shape[0]
    top = np.argsort(-y_pred, axis=1)[:, :k]
    hits = y_true[np.arange(n)[:, None], top] > 0
    recall = hits.sum(1) / np.minimum(k, (y_true > 0).sum(1))
    w = 1.0 / np.log2(np.arange(2, k + 2))
    idcg = np.array([w[: int(m)].sum() for m in np.minimum(k, (y_true > 0).sum(1))])
    return recall.mean(), ((hits * w).sum(1) / idcg).mean()


def test_matches_reference_formula_on_random_scores():
    rng = np.random.default_rng(0)
    num_users, num_items = 40, 60
    scores = rng.standard_normal((num_users, num_items))
    train = [rng.choice(num_items, rng.integers(0, 10), replace=False) for _ in range(num_users)]
    heldout = []
    for u in range(num_users):
        rest = np.setdiff1d(np.arange(num_items), train[u])
        heldout.append(rng.choice(rest, rng.integers(1, 15), replace=False))
    topk = rank_items(scores, train, 20)
    got = evaluate_topk(topk, heldout, ks=(5, 20), ndcg_ks=(20,))
    masked = scores.copy()
    y_true = np.zeros_like(scores)
    for u in range(num_users):
        masked[u, train[u]] = -np.inf
        y_true[u, heldout[u]] = 1
    for k in (5, 20):
        rec, ndcg = reference_metrics(y_true, masked, k)
        assert got[f"recall@{k}"] == pytest.approx(rec)
    assert got["ndcg@20"] == pytest.approx(reference_metrics(y_true, masked, 20)[1])


# ----------------------------------------------------------------------------- ranking


def test_rank_items_ties_lower_index_first():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert rank_items(scores, None, 3).tolist() == [[1, 2, 4]]
    assert rank_items(scores, None, 2).tolist() == [[1, 2]]  # tie at the boundary
    assert rank_items(np.array([[0.0, 5.0, 5.0, 5.0, 1.0]]), None, 2).tolist() == [[1, 2]]
    assert rank_items(np.zeros((1, 4)), None, 4).tolist() == [[0, 1, 2, 3]]


def test_rank_items_excludes_and_pads():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert rank_items(scores, [arr(2)], 3).tolist() == [[1, 4, 0]]
    assert rank_items(scores, [arr(2)], 5).tolist() == [[1, 4, 0, 3, PAD]]
    assert rank_items(scores, [arr(2)], 7).tolist() == [[1, 4, 0, 3, PAD, PAD, PAD]]
    assert rank_items(scores, [arr(0, 1, 2, 3, 4)], 2).tolist() == [[PAD, PAD]]


def test_rank_items_rankable_minus_inf_beats_excluded():
    scores = np.array([[-np.inf, 1.0, -np.inf]])
    assert rank_items(scores, [arr(0)], 3).tolist() == [[1, 2, PAD]]
    assert rank_items(scores, [arr(2)], 3).tolist() == [[1, 0, PAD]]


def test_rank_items_matches_stable_full_sort_with_many_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(700, 30)).astype(np.float32)  # > one internal chunk
    exclude = [rng.choice(30, rng.integers(0, 28), replace=False) for _ in range(700)]
    k = 10
    got = rank_items(scores, exclude, k)
    for u in range(700):
        allowed = np.setdiff1d(np.arange(30), exclude[u])
        ref = allowed[np.lexsort((allowed, -scores[u, allowed]))][:k]
        expect = np.full(k, PAD)
        expect[: len(ref)] = ref
        assert got[u].tolist() == expect.tolist()
        assert not set(got[u].tolist()) & set(exclude[u].tolist())


def test_rank_items_rejects_nan_and_accepts_torch():
    with pytest.raises(ValueError, match="NaN"):
        rank_items(np.array([[0.0, np.nan]]), None, 1)
    torch = pytest.importorskip("torch")
    scores = torch.tensor([[0.5, 2.0, 1.0]], dtype=torch.bfloat16)
    assert rank_items(scores, [arr(1)], 2).tolist() == [[2, 0]]


def test_combine_exclusions():
    merged = combine_exclusions([arr(0), arr()], [arr(2), arr(1)], None)
    assert [m.tolist() for m in merged] == [[0, 2], [1]]
    assert combine_exclusions(None) is None


# ----------------------------------------------------------------------------- sums and counts


def test_sums_over_two_shards_equal_direct_mean():
    rng = np.random.default_rng(2)
    num_users, num_items = 50, 120
    scores = rng.standard_normal((num_users, num_items))
    heldout = [rng.choice(num_items, rng.integers(0, 6), replace=False) for _ in range(num_users)]
    heldout[3] = arr()  # make sure some users are skipped
    topk = rank_items(scores, None, 100)
    direct = evaluate_topk(topk, heldout)
    assert set(direct) == {"recall@20", "recall@40", "ndcg@100", "num_users", "num_skipped"}
    # Unequal shards: averaging the two shard means would be wrong; summing is not.
    a = metric_sums(topk[:13], heldout[:13])
    b = metric_sums(topk[13:], heldout[13:])
    merged = finalize(merge_sums(a, b))
    assert merged["num_users"] + merged["num_skipped"] == num_users
    assert merged["num_skipped"] >= 1
    for key in ("recall@20", "recall@40", "ndcg@100"):
        assert merged[key] == pytest.approx(direct[key])
    assert merged["num_users"] == direct["num_users"]
    # Without torch.distributed initialised the all-reduce is the identity.
    assert all_reduce_sums(a) == a


def test_merge_sums_rejects_mismatched_metrics():
    topk = np.array([[0, 1]])
    with pytest.raises(ValueError):
        merge_sums(metric_sums(topk, [arr(0)], ks=(1,), ndcg_ks=()), metric_sums(topk, [arr(0)], ks=(2,), ndcg_ks=()))


# ----------------------------------------------------------------------------- on an EvalSplit


def small_split() -> EvalSplit:
    return EvalSplit(
        num_users=3,
        num_items=6,
        train=[arr(0), arr(1), arr(2, 3)],
        valid=[arr(1), arr(2), arr()],
        test=[arr(2), arr(3), arr(4)],
    )


def test_split_targets_and_exclude_valid_on_test():
    split = small_split()
    held, excl = split_targets(split, "valid")
    assert [h.tolist() for h in held] == [[1], [2], []]
    assert [e.tolist() for e in excl] == [[0], [1], [2, 3]]
    _, excl = split_targets(split, "test")
    assert [sorted(e.tolist()) for e in excl] == [[0, 1], [1, 2], [2, 3]]
    _, excl = split_targets(split, "test", exclude_valid_on_test=False)
    assert [e.tolist() for e in excl] == [[0], [1], [2, 3]]
    with pytest.raises(ValueError):
        split_targets(split, "train")


def test_evaluate_split_masks_valid_items_when_testing():
    split = small_split()
    # Every user scores items 0..5 in decreasing index order: 5 > 4 > ... > 0.
    def score(users):
        return np.tile(np.arange(6, dtype=np.float64), (len(users), 1))

    # User 0 (test item 2): train {0}, valid {1}. Ranking excluding train+valid: 5,4,3,2 -> hit at rank 3.
    out = evaluate_split(score, split, "test", ks=(4,), ndcg_ks=(4,))
    assert out["num_users"] == 3
    per_user = {
        0: (1.0, 1 / math.log2(5)),  # 5,4,3,2 -> item 2 at rank 3
        1: (1.0, 1 / math.log2(4)),  # 5,4,3 -> item 3 at rank 2
        2: (1.0, 1 / math.log2(3)),  # 5,4 -> item 4 at rank 1
    }
    assert out["recall@4"] == pytest.approx(1.0)
    assert out["ndcg@4"] == pytest.approx(np.mean([v[1] for v in per_user.values()]))
    # Sharded users + merged sums give the same answer; batch size does not matter.
    shards = [split_metric_sums(score, split, "test", users=u, ks=(4,), ndcg_ks=(4,), batch_users=1)
              for u in ([0], [1, 2])]
    assert finalize(merge_sums(*shards)) == pytest.approx(out)
    # Validation skips user 2 (no valid items).
    valid = evaluate_split(score, split, "valid", ks=(4,), ndcg_ks=(4,))
    assert valid["num_users"] == 2 and valid["num_skipped"] == 1


def test_cold_slices_of_an_eval_split_are_the_plain_metrics_on_the_restricted_targets():
    """``cold/*`` = the same ranking scored against the held-out cold items only; ``cold_only/*`` = the ranking
    with every warm item excluded too; ``cold_only_random/*`` = the expected recall of a random order of each
    user's cold candidates (h * min(K, n) / n hits over min(K, h)), computed here by hand. Sharded users and
    merged sums give the same numbers, and a split without cold items reports no slice."""
    rng = np.random.default_rng(0)
    num_users, num_items, cold_items = 40, 30, np.arange(0, 30, 3)
    train, valid, test = [], [], []
    for _ in range(num_users):
        items = rng.permutation(num_items)[:12]
        train.append(np.sort(np.setdiff1d(items[:6], cold_items)))
        valid.append(np.sort(items[6:9]))
        test.append(np.sort(items[9:]))
    split = EvalSplit(num_users, num_items, train, valid, test, cold_items)
    scores = rng.random((num_users, num_items))

    def score(users):
        return scores[users]

    cold = split.cold_mask()
    warm = np.flatnonzero(~cold)
    for part in ("valid", "test"):
        out = evaluate_split(score, split, part, ks=(2, 5), ndcg_ks=(5,))
        held, excl = split_targets(split, part)
        held_cold = [h[cold[h]] for h in held]
        plain = EvalSplit(num_users, num_items, train, valid, test)
        assert {k: v for k, v in out.items() if "/" not in k and "cold" not in k} == \
            pytest.approx(evaluate_split(score, plain, part, ks=(2, 5), ndcg_ks=(5,)))
        want_cold = evaluate_topk(rank_items(scores, excl, 5), held_cold, ks=(2, 5), ndcg_ks=(5,))
        want_only = evaluate_topk(rank_items(scores, [np.union1d(e, warm) for e in excl], 5), held_cold,
                                  ks=(2, 5), ndcg_ks=(5,))
        assert out["num_cold_users"] == want_cold["num_users"] == sum(len(h) > 0 for h in held_cold) > 0
        assert out["num_cold_skipped"] == want_cold["num_skipped"]
        for key in ("recall@2", "recall@5", "ndcg@5"):
            assert out[f"cold/{key}"] == pytest.approx(want_cold[key])
            assert out[f"cold_only/{key}"] == pytest.approx(want_only[key])
        for k in (2, 5):
            expected = [len(h) * min(k, n) / n / min(k, len(h))
                        for h, n in ((h, int(cold.sum()) - int(cold[e].sum())) for h, e in zip(held_cold, excl))
                        if len(h)]
            assert out[f"cold_only_random/recall@{k}"] == pytest.approx(np.mean(expected))
        shards = [split_metric_sums(score, split, part, users=u, ks=(2, 5), ndcg_ks=(5,), batch_users=7)
                  for u in (np.arange(0, 13), np.arange(13, num_users))]
        assert finalize(merge_sums(*shards)) == pytest.approx(out)
    assert not any("cold" in key for key in evaluate_split(score, plain, "test"))
