"""Per-rank batches: equal steps, world-size-invariant data, online reordering and masked prompting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.model.batch import PAD_ID, pack_rows
from cllm4rec_dist.recommenders.cllm4rec.batches import (
    BatchSettings,
    CorpusBatches,
    mask_items,
    partition_sizes,
    read_partition,
)
from cllm4rec_dist.recommenders.cllm4rec.prompts import prediction_prompts


@pytest.fixture(scope="module")
def corpora(demo_data):
    ds = ShardedDataset(demo_data)
    space = TokenSpace(ds.vocab_size, ds.num_users, ds.num_items)
    return ds, space, {name: ds.read_corpus(name) for name in ("collab", "content", "rec", "eval")}


def batches(ds, space, name, rank=0, world=1, **settings):
    return CorpusBatches.for_rank(ds, name, space, BatchSettings(**settings), rank, world)


@pytest.mark.parametrize("world", [1, 2, 3, 8, 9])
def test_each_rank_reads_its_own_part_and_all_run_the_same_steps(corpora, world):
    ds, space, docs = corpora
    entry = ds.corpus_entry("content")
    parts = [batches(ds, space, "content", r, world, batch_size=7) for r in range(world)]
    assert len({p.steps_per_epoch for p in parts}) == 1
    assert parts[0].steps_per_epoch == max(-(-n // 7) for n in partition_sizes(entry, world))
    read = [read_partition(ds, "content", r, world) for r in range(world)]
    ids = [set(global_ids.tolist()) for _, global_ids in read]
    assert set().union(*ids) == set(range(len(docs["content"]))) and sum(map(len, ids)) == len(docs["content"])
    for part, global_ids in read:  # the documents really are the ones at those global indices
        assert all(d == docs["content"][i] for d, i in zip(part, global_ids))
    if len(entry["shards"]) >= world:  # shard-level partition: rank r holds shards r, r+W, ...
        first_of_shard = np.cumsum([0] + [s["num_docs"] for s in entry["shards"]])[:-1]
        for r, _p in enumerate(parts):
            assert {int(first_of_shard[k]) for k in range(r, len(entry["shards"]), world)} <= ids[r]
    for p in parts:  # an epoch covers the whole partition
        seen = set()
        for step in range(p.steps_per_epoch):
            seen.update(p.doc_positions(0, step).tolist())
        assert seen == set(range(p.reader.size))
    with pytest.raises(IndexError):
        parts[0].batch(0, parts[0].steps_per_epoch)


def test_a_corpus_too_small_for_the_world_is_a_clear_error(corpora):
    ds, space, docs = corpora
    with pytest.raises(ValueError, match="too few for"):
        batches(ds, space, "collab", 0, len(docs["collab"]) + 1)


def test_batches_are_deterministic_and_epochs_differ(corpora):
    ds, space, _ = corpora
    b = batches(ds, space, "collab", batch_size=5)
    x, y, z = b.batch(0, 1), b.batch(0, 1), b.batch(1, 1)
    assert x.input_ids.equal(y.input_ids)
    assert not x.input_ids.equal(z.input_ids)


@pytest.mark.parametrize("pack", [False, True])
def test_lm_batch_layout(corpora, pack):
    ds, space, docs = corpora
    b = batches(ds, space, "content", batch_size=6, pack=pack)
    batch = b.batch(0, 0)
    covered = torch.zeros_like(batch.attention_mask)
    for k, position in enumerate(b.doc_positions(0, 0)):
        row, start, n = int(batch.doc_rows[k]), int(batch.doc_starts[k]), int(batch.lengths[k])
        doc = docs["content"][position]
        assert batch.document(k).tolist() == (doc["prompt"] + doc["main"])[:n]
        assert batch.position_ids[row, start:start + n].tolist() == list(range(n))
        assert 0 < batch.prompt_lengths[k] < n
        covered[row, start:start + n] += 1
    assert covered.max() == 1 and covered.equal(batch.attention_mask)  # documents never overlap
    assert (batch.input_ids[batch.attention_mask == 0] == PAD_ID).all()
    if not pack:
        assert batch.doc_rows.tolist() == list(range(6)) and not batch.doc_starts.any()
    else:  # never worse than one document per row
        unpacked = batches(ds, space, "content", batch_size=6, pack=False).batch(0, 0)
        assert batch.input_ids.shape[0] <= 6 and batch.real_token_fraction >= unpacked.real_token_fraction


def test_reordering_changes_main_order_but_not_the_prompt(corpora):
    ds, space, docs = corpora
    collab = docs["collab"]
    on = batches(ds, space, "collab", batch_size=len(collab), reorder=True)
    off = batches(ds, space, "collab", batch_size=len(collab), reorder=False)
    idx = on.doc_positions(0, 0)
    assert np.array_equal(idx, off.doc_positions(0, 0))
    a, c = on.batch(0, 0), off.batch(0, 0)
    changed = 0
    for row, d in enumerate(idx):
        doc = collab[d]
        p, n = len(doc["prompt"]), len(doc["prompt"]) + len(doc["main"])
        assert a.document(row)[:p].tolist() == doc["prompt"]
        main = a.document(row)[p:n].tolist()
        assert sorted(main) == sorted(doc["main"])
        changed += main != doc["main"]
        assert c.document(row)[p:n].tolist() == doc["main"]  # LLM-FixOrd: stored order
    assert changed > len(idx) // 2


def test_masked_prompting_never_leaks_a_held_out_item_into_the_prompt(corpora):
    ds, space, docs = corpora
    rec = docs["rec"]
    b = batches(ds, space, "rec", batch_size=len(rec), mask_ratio=0.2)
    for epoch in range(3):
        batch = b.batch(epoch, 0)
        for row, d in enumerate(b.doc_positions(epoch, 0)):
            prompt = batch.document(row).tolist()
            prompt_items = {space.item_of(t) for t in prompt if space.is_item(t)}
            held = set(batch.target_items[batch.target_rows == row].tolist())
            assert held and prompt_items, "at least one kept and one held out"
            assert not (held & prompt_items)
            assert held | prompt_items == set(rec[d]["items"])
            assert prompt[-len(rec[d]["prompt_suffix"]):] == rec[d]["prompt_suffix"]


def test_mask_items_edge_cases():
    rng = np.random.default_rng(0)
    assert mask_items([5], 0.2, rng) == ([5], [])
    for ratio in (0.0, 1.0):
        kept, held = mask_items([1, 2, 3], ratio, rng)
        assert len(kept) >= 1 and len(held) >= 1
    shares = [len(mask_items(list(range(100)), 0.2, np.random.default_rng(s))[1]) for s in range(50)]
    assert 15 < np.mean(shares) < 25


def test_prediction_prompts_use_all_train_items(corpora):
    _, space, docs = corpora
    ev = docs["eval"][:5]
    prompts = pack_rows(prediction_prompts(ev, space, style="rec"))
    for k, doc in enumerate(ev):
        tokens = prompts.document(k).tolist()
        assert {space.item_of(t) for t in tokens if space.is_item(t)} == set(doc["train"])
        assert tokens[-len(doc["prompt_suffix"]):] == doc["prompt_suffix"]
    padded = pack_rows(prediction_prompts(ev, space, style="rec"), pack=False)
    assert all(padded.document(k).equal(prompts.document(k)) for k in range(len(ev)))
    collab = pack_rows(prediction_prompts(ev, space, style="collab"))
    assert (collab.lengths == prompts.lengths - len(ev[0]["prompt_suffix"])).all()


def test_prediction_prompts_without_reordering_keep_the_training_order(corpora):
    """LLM-FixOrd is scored as it trained: the stored order, cut to the latest items like its batches."""
    ds, space, docs = corpora
    ev = docs["eval"][:5]
    fixed_prompts = pack_rows(prediction_prompts(ev, space, style="collab", reorder=False))
    shuffled = pack_rows(prediction_prompts(ev, space, style="collab", reorder=True))
    items_of = lambda tokens: [space.item_of(t) for t in tokens.tolist() if space.is_item(t)]  # noqa: E731
    for k, doc in enumerate(ev):
        assert items_of(fixed_prompts.document(k)) == list(doc["train"])
    assert any(not fixed_prompts.document(k).equal(shuffled.document(k)) for k in range(len(ev)))
    # the same (user's) collab document, as an L-step batch without reordering, has the same items in order
    user = int(ev[0]["user"])
    position = next(k for k, d in enumerate(docs["collab"]) if int(d["user"]) == user)
    collab = batches(ds, space, "collab", batch_size=len(docs["collab"]), reorder=False)
    row = collab.doc_positions(3, 0).tolist().index(position)  # one rank: partition position = global index
    assert items_of(collab.batch(3, 0).document(row)) == items_of(fixed_prompts.document(0))
    budget = len(ev[0]["prompt_prefix"]) + 3  # too long: the latest 3 items, as the training batches keep
    cut = pack_rows(prediction_prompts(ev[:1], space, style="collab", max_length=budget, reorder=False))
    assert items_of(cut.document(0)) == ev[0]["train"][-3:]
