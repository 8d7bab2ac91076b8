"""The paper's protocol: duplicates, binarisation, k-core, split sizes, determinism, no held-out text leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cllm4rec_dist.data.protocol import ProtocolConfig, apply_protocol, holdout_sizes, kcore_filter
from cllm4rec_dist.data.records import InputError, RawDataset


def random_raw(seed=0, users=60, items=40, n=2500, with_reviews=True) -> RawDataset:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        u, i = int(rng.integers(users)), int(items * rng.random() ** 2)
        rows.append((f"u{u}", f"i{i}", float(rng.integers(1, 6)), float(k),
                     f"review {u} {i} {k}" if with_reviews else ""))
    return RawDataset("random", RawDataset.frame(rows))


def test_kcore_really_holds_after_filtering():
    split = apply_protocol(random_raw(), ProtocolConfig(kcore=5))
    user_counts = [len(a) + len(b) + len(c) for a, b, c in zip(split.train, split.valid, split.test)]
    assert min(user_counts) >= 5
    item_counts = np.bincount(np.concatenate(split.train + split.valid + split.test), minlength=split.num_items)
    assert item_counts.min() >= 5
    assert split.stats["kcore_iterations"] >= 2  # the iteration actually had to repeat


def test_kcore_is_iterative():
    # Removing user c (2 items) drops item y below k=2, which then drops user b to 1 item.
    df = RawDataset.frame([("a", "x", 5, 0, ""), ("a", "z", 5, 1, ""), ("b", "x", 5, 2, ""), ("b", "y", 5, 3, ""),
                           ("c", "y", 5, 4, ""), ("d", "z", 5, 5, ""), ("d", "x", 5, 6, "")])
    out, _ = kcore_filter(df.iloc[[0, 1, 2, 3, 5, 6]], 2)
    assert set(out["user"]) == {"a", "d"} and set(out["item"]) == {"x", "z"}


def test_binarisation_keeps_rating_above_threshold_only():
    raw = random_raw()
    split = apply_protocol(raw, ProtocolConfig(kcore=0))
    kept = raw.interactions[raw.interactions["rating"] > 3].drop_duplicates(["user", "item"])
    assert split.stats["num_interactions"] <= len(kept)
    assert split.stats["binarize_dropped"] > 0
    nob = apply_protocol(raw, ProtocolConfig(kcore=0, binarize=False))
    assert nob.stats["num_interactions"] > split.stats["num_interactions"]


def test_data_without_ratings_is_not_binarised():
    raw = random_raw()
    raw.interactions["rating"] = np.nan
    raw.has_ratings = False
    split = apply_protocol(raw, ProtocolConfig(kcore=0))
    assert split.stats["binarized"] is False and split.stats["num_interactions"] > 0


def test_split_sizes_and_at_least_one_held_out():
    split = apply_protocol(random_raw(), ProtocolConfig())
    for tr, va, te in zip(split.train, split.valid, split.test):
        n = len(tr) + len(va) + len(te)
        assert len(va) >= 1 and len(te) >= 1 and len(tr) >= 1
        assert (len(va), len(te)) == holdout_sizes(n, ProtocolConfig())
        assert not (set(tr) & set(va)) and not (set(tr) & set(te)) and not (set(va) & set(te))
    assert holdout_sizes(5, ProtocolConfig()) == (1, 1)
    assert holdout_sizes(25, ProtocolConfig()) == (3, 3)  # 2.5 rounds half up
    assert holdout_sizes(100, ProtocolConfig()) == (10, 10)


def test_split_is_deterministic_by_seed():
    a = apply_protocol(random_raw(), ProtocolConfig(seed=1))
    b = apply_protocol(random_raw(), ProtocolConfig(seed=1))
    c = apply_protocol(random_raw(), ProtocolConfig(seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a.test, b.test))
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert any(not np.array_equal(x, y) for x, y in zip(a.test, c.test))


def test_no_review_of_a_held_out_pair_reaches_the_content_corpus():
    split = apply_protocol(random_raw(), ProtocolConfig())
    heldout = {(u, int(i)) for u in range(split.num_users) for i in np.concatenate([split.valid[u], split.test[u]])}
    assert split.reviews
    assert not any((u, i) in heldout for u, i, _ in split.reviews)
    assert split.stats["heldout_reviews_dropped"] > 0


def test_duplicates_keep_the_latest_and_are_counted():
    rows = [("a", "x", 1.0, 10.0, "old"), ("a", "x", 5.0, 20.0, "new")] + [
        (f"u{k}", f"i{j}", 5.0, float(k), "") for k in range(3) for j in range(3)]
    split = apply_protocol(RawDataset("d", RawDataset.frame(rows)), ProtocolConfig(kcore=0))
    assert split.stats["duplicates_merged"] == 1
    a = split.user_ids.index("a")
    assert len(split.train[a]) + len(split.valid[a]) + len(split.test[a]) == 1  # rating 5 survived binarisation


def test_ids_are_contiguous_and_naturally_ordered():
    rows = [(str(u), str(i), 5.0, 0.0, "") for u in (10, 2, 1) for i in (30, 4, 100)]
    split = apply_protocol(RawDataset("d", RawDataset.frame(rows)), ProtocolConfig(kcore=0))
    assert split.user_ids == ["1", "2", "10"] and split.item_ids == ["4", "30", "100"]


def test_empty_after_filtering_is_a_clear_error():
    rows = [("a", "x", 5.0, 0.0, ""), ("b", "y", 5.0, 1.0, "")]
    with pytest.raises(InputError, match="no interactions left.*--kcore"):
        apply_protocol(RawDataset("tiny", RawDataset.frame(rows)), ProtocolConfig())


def test_bad_protocol_settings_are_rejected():
    with pytest.raises(ValueError, match="valid_fraction"):
        apply_protocol(random_raw(), ProtocolConfig(valid_fraction=0.6, test_fraction=0.5))


def test_frame_columns():
    df = RawDataset.frame([("a", "b", 1.0, 0.0, "t")])
    assert list(df.columns) == ["user", "item", "rating", "timestamp", "review"]
    assert isinstance(df, pd.DataFrame)


# ---- regimes where text can matter: sparse users, cold items -------------------------------------

def test_max_train_per_user_caps_train_only_seeded():
    full = apply_protocol(random_raw(), ProtocolConfig())
    cfg = ProtocolConfig(max_train_per_user=3)
    sparse, again = apply_protocol(random_raw(), cfg), apply_protocol(random_raw(), cfg)
    assert max(len(t) for t in sparse.train) == 3 and any(len(t) > 3 for t in full.train)
    for u in range(full.num_users):
        assert set(sparse.train[u]) <= set(full.train[u])
        assert len(sparse.train[u]) == min(3, len(full.train[u]))
        assert np.array_equal(sparse.valid[u], full.valid[u]) and np.array_equal(sparse.test[u], full.test[u])
        assert np.array_equal(sparse.train[u], again.train[u])
        order = {int(i): k for k, i in enumerate(full.train[u])}  # kept in chronological order
        assert [order[int(i)] for i in sparse.train[u]] == sorted(order[int(i)] for i in sparse.train[u])
    kept = {(u, int(i)) for u, t in enumerate(sparse.train) for i in t}
    assert sparse.reviews and all((u, i) in kept for u, i, _ in sparse.reviews)
    assert sparse.stats["max_train_per_user_dropped"] == full.stats["num_train"] - sparse.stats["num_train"]
    other_seed = apply_protocol(random_raw(), ProtocolConfig(max_train_per_user=3, seed=1))
    assert any(not np.array_equal(a, b) for a, b in zip(sparse.train, other_seed.train) if len(a) == 3)


def test_cold_items_never_reach_training_but_stay_in_valid_test_and_content():
    raw = random_raw()
    raw.item_texts.update({f"i{i}": f"text of item {i}" for i in range(40)})
    full = apply_protocol(raw, ProtocolConfig())
    split = apply_protocol(raw, ProtocolConfig(cold_item_fraction=0.25))
    cold = set(split.stats["cold_items"])
    assert len(cold) == round(0.25 * split.num_items)
    assert not cold & {int(i) for t in split.train for i in t}
    assert not cold & {i for _, i, _ in split.reviews}
    assert cold & {int(i) for v in split.valid + split.test for i in v}, "cold items are evaluated"
    assert cold <= set(split.item_texts), "their content stays: it is all the model knows of them"
    for u in range(split.num_users):
        assert np.array_equal(split.valid[u], full.valid[u]) and np.array_equal(split.test[u], full.test[u])
    assert split.stats["cold_train_dropped"] == full.stats["num_train"] - split.stats["num_train"]
    with pytest.raises(ValueError, match="cold_item_fraction"):
        apply_protocol(raw, ProtocolConfig(cold_item_fraction=1.0))
