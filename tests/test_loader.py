"""Per-rank batches: equal steps, world-size-invariant data, online reordering and masked prompting."""

from __future__ import annotations

import numpy as np
import pytest

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.model.batch import PAD_ID
from cllm4rec_dist.train.loader import BatchSettings, CorpusBatches, mask_items, prediction_prompts


@pytest.fixture(scope="module")
def corpora(demo_data):
    ds = ShardedDataset(demo_data)
    space = TokenSpace(ds.vocab_size, ds.num_users, ds.num_items)
    return ds, space, {name: ds.read_corpus(name) for name in ("collab", "content", "rec", "eval")}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_runs_the_same_steps_and_an_epoch_covers_every_document(corpora, world):
    _, space, docs = corpora
    b = CorpusBatches("content", docs["content"], space, BatchSettings(batch_size=7), world_size=world)
    seen = set()
    for step in range(b.steps_per_epoch):
        for rank in range(world):
            idx = b.doc_indices(epoch=0, step=step, rank=rank)
            assert len(idx) == 7
            seen.update(idx.tolist())
    assert seen == set(range(len(docs["content"])))
    with pytest.raises(IndexError):
        b.batch(0, b.steps_per_epoch)


def test_two_ranks_see_what_one_process_accumulating_two_micro_batches_sees(corpora):
    _, space, docs = corpora
    two = CorpusBatches("collab", docs["collab"], space, BatchSettings(batch_size=4), world_size=2)
    one = CorpusBatches("collab", docs["collab"], space, BatchSettings(batch_size=8), world_size=1)
    assert two.steps_per_epoch == one.steps_per_epoch
    for step in range(two.steps_per_epoch):
        both = np.concatenate([two.doc_indices(1, step, r) for r in range(2)])
        assert np.array_equal(both, one.doc_indices(1, step, 0))


def test_batches_are_deterministic_and_epochs_differ(corpora):
    _, space, docs = corpora
    b = CorpusBatches("collab", docs["collab"], space, BatchSettings(batch_size=5))
    x, y, z = b.batch(0, 1), b.batch(0, 1), b.batch(1, 1)
    assert x.input_ids.equal(y.input_ids)
    assert not x.input_ids.equal(z.input_ids)


def test_lm_batch_layout(corpora):
    _, space, docs = corpora
    batch = CorpusBatches("content", docs["content"], space, BatchSettings(batch_size=6)).batch(0, 0)
    for row in range(6):
        n = int(batch.lengths[row])
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert (batch.input_ids[row, n:] == PAD_ID).all()
        assert 0 < batch.prompt_lengths[row] < n


def test_reordering_changes_main_order_but_not_the_prompt(corpora):
    _, space, docs = corpora
    collab = docs["collab"]
    on = CorpusBatches("collab", collab, space, BatchSettings(batch_size=len(collab), reorder=True))
    off = CorpusBatches("collab", collab, space, BatchSettings(batch_size=len(collab), reorder=False))
    idx = on.doc_indices(0, 0, 0)
    a, c = on.batch(0, 0), off.batch(0, 0)
    changed = 0
    for row, d in enumerate(idx):
        doc = collab[d]
        p, n = len(doc["prompt"]), len(doc["prompt"]) + len(doc["main"])
        assert a.input_ids[row, :p].tolist() == doc["prompt"]
        main = a.input_ids[row, p:n].tolist()
        assert sorted(main) == sorted(doc["main"])
        changed += main != doc["main"]
        assert c.input_ids[row, p:n].tolist() == doc["main"]  # LLM-FixOrd: stored order
    assert changed > len(idx) // 2


def test_masked_prompting_never_leaks_a_held_out_item_into_the_prompt(corpora):
    _, space, docs = corpora
    rec = docs["rec"]
    b = CorpusBatches("rec", rec, space, BatchSettings(batch_size=len(rec), mask_ratio=0.2))
    for epoch in range(3):
        batch = b.batch(epoch, 0)
        for row, d in enumerate(b.doc_indices(epoch, 0, 0)):
            prompt = batch.input_ids[row, : batch.lengths[row]].tolist()
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
    ids, mask, lengths = prediction_prompts(ev, space, style="rec")
    for row, doc in enumerate(ev):
        items = {space.item_of(t) for t in ids[row, : lengths[row]].tolist() if space.is_item(t)}
        assert items == set(doc["train"])
        assert ids[row, lengths[row] - len(doc["prompt_suffix"]): lengths[row]].tolist() == doc["prompt_suffix"]
    ids2, _, lengths2 = prediction_prompts(ev, space, style="collab")
    assert (lengths2 == lengths - len(ev[0]["prompt_suffix"])).all()
