"""Streamed corpora: bounded memory, the in-memory order as the buffer = whole-partition case, determinism,
exact mid-epoch resume, equal steps per rank, shards verified while streaming (real webdataset shards)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
from cllm4rec_dist.recommenders.cllm4rec.batches import BatchSettings, CorpusBatches, read_partition


@pytest.fixture(scope="module")
def data(demo_data):
    ds = ShardedDataset(demo_data)
    return ds, TokenSpace(ds.vocab_size, ds.num_users, ds.num_items)


def batches(data, name, rank=0, world=1, **settings):
    ds, space = data
    return CorpusBatches.for_rank(ds, name, space, BatchSettings(**settings), rank, world)


def in_memory_positions(n: int, seed: int, name: str, epoch: int, rank: int, step: int, batch_size: int) -> list[int]:
    """The reader before streaming, written out: one seeded permutation of the partition per epoch, wrapped."""
    perm = np.random.default_rng([seed, sum(map(ord, name)), epoch, rank, 3]).permutation(n)
    return perm[np.arange(step * batch_size, (step + 1) * batch_size) % n].tolist()


@pytest.mark.parametrize("world", [1, 2])
def test_a_buffer_covering_the_partition_gives_the_in_memory_batches(data, world):
    ds, _ = data
    for name in ("content", "rec"):
        for rank in range(world):
            docs, _ = read_partition(ds, name, rank, world)
            covering = [batches(data, name, rank, world, batch_size=7, seed=3, shuffle_buffer=size)
                        for size in (0, len(docs), 10 * len(docs))]
            for epoch in (0, 1):
                for step in range(covering[0].steps_per_epoch):
                    expected = in_memory_positions(len(docs), 3, name, epoch, rank, step, 7)
                    for b in covering:
                        pairs = b.reader.take(epoch, step * 7, 7)
                        assert [p for p, _ in pairs] == expected
                        assert [d for _, d in pairs] == [docs[p] for p in expected]
            assert covering[0].reader.high_water == len(docs)  # the in-memory case holds its partition


def test_streaming_holds_at_most_the_buffer_and_covers_each_epoch_once(data):
    ds, _ = data
    docs, _ = read_partition(ds, "content", 0, 1)
    n, buffer = len(docs), 50
    b = batches(data, "content", batch_size=16, shuffle_buffer=buffer)
    per_shard = max(s["num_docs"] for s in ds.corpus_entry("content")["shards"])
    assert buffer < per_shard < n  # smaller than one shard: the bound is the buffer, not the shard size
    orders = []
    for epoch in (0, 1):
        seen = []
        for step in range(b.steps_per_epoch):
            pairs = b.reader.take(epoch, step * 16, 16)
            assert all(doc == docs[p] for p, doc in pairs)
            seen.extend(p for p, _ in pairs)
            assert len(b.reader.docs) <= buffer
        assert sorted(seen[:n]) == list(range(n))  # every document once, then the wrap-around
        orders.append(seen[:n])
    assert b.reader.high_water == buffer  # filled, never exceeded
    assert orders[0] != orders[1]
    full = in_memory_positions(n, 0, "content", 0, 0, 0, n)
    assert orders[0] != full  # a different (local) shuffle than the in-memory one
    # the shard order is shuffled per epoch: the first documents out come from different shards
    shard_of = lambda p: next(k for k, part in enumerate(b.reader.parts) if part.first <= p < part.first + part.count)  # noqa: E731
    assert shard_of(orders[0][0]) != shard_of(orders[1][0]) or shard_of(orders[0][-1]) != shard_of(orders[1][-1])


def test_the_order_is_a_pure_function_of_epoch_and_step(data):
    """Two runs, and any access pattern (random access seeks), give the same batches."""
    first = batches(data, "content", batch_size=16, shuffle_buffer=40)
    second = batches(data, "content", batch_size=16, shuffle_buffer=40)
    steps = first.steps_per_epoch
    sequential = {(e, s): first.doc_positions(e, s).tolist() for e in (0, 1) for s in range(steps)}
    for epoch, step in [(1, 5), (0, 2), (0, steps - 1), (1, 0), (0, 3), (0, 3), (0, 4)]:
        assert second.doc_positions(epoch, step).tolist() == sequential[(epoch, step)]
        assert second.reader.high_water <= 40
    a, b = first.batch(0, 7), second.batch(0, 7)
    assert a.input_ids.equal(b.input_ids) and a.position_ids.equal(b.position_ids)


def test_resume_mid_epoch_continues_exactly_and_checks_the_saved_state(data):
    settings = dict(batch_size=8, shuffle_buffer=24)
    steps = batches(data, "rec", **settings).steps_per_epoch
    for stop in (steps // 2, steps - 2):  # while the buffer replaces documents, and while it drains at the end
        run = batches(data, "rec", **settings)
        for step in range(stop):
            run.batch(1, step)
        saved = run.reader_state(1, stop)  # what the checkpoint holds before batch (1, stop)
        later = [run.batch(1, step) for step in range(stop, steps)]
        resumed = batches(data, "rec", **settings)
        reads_before = resumed.reader.shard_reads
        assert resumed.restore_reader(saved, 1, stop) is None
        assert resumed.reader.shard_reads - reads_before < len(resumed.reader.parts)  # only shards holding residents
        for step, expected in zip(range(stop, steps), later):
            got = resumed.batch(1, step)
            assert got.input_ids.equal(expected.input_ids) and got.target_items.equal(expected.target_items)
    # another buffer: the saved state does not apply (said so), the position comes from (epoch, step) alone
    other = batches(data, "rec", batch_size=8, shuffle_buffer=25)
    assert "buffer_docs 24 -> 25" in other.restore_reader(saved, 1, stop)
    # a state that should apply but is not reproduced is an error
    with pytest.raises(ValueError, match="not reproduced"):
        batches(data, "rec", **settings).restore_reader({**saved, "resident_sha256": "0" * 64}, 1, stop)


@pytest.mark.parametrize("world", [2, 9])  # 9 ranks > 8 shards: every 9th document of every shard
def test_every_rank_runs_the_same_steps_when_streaming(data, world):
    ds, _ = data
    parts = [batches(data, "collab", r, world, batch_size=4, shuffle_buffer=5) for r in range(world)]
    steps = parts[0].steps_per_epoch
    assert {p.steps_per_epoch for p in parts} == {steps}
    for r, p in enumerate(parts):
        docs, _ = read_partition(ds, "collab", r, world)
        seen = []
        for step in range(steps):
            batch = p.batch(0, step)
            assert len(batch.lengths) == 4
            seen.extend(p.doc_positions(0, step).tolist())
        assert len(seen) == steps * 4 and sorted(seen[:len(docs)]) == list(range(len(docs)))
        assert p.reader.high_water <= 5


def test_a_shard_changed_while_streaming_is_never_read_as_a_whole_one(demo_data, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(demo_data, copy)
    ds = ShardedDataset(str(copy))
    b = CorpusBatches.for_rank(ds, "content", TokenSpace(ds.vocab_size, ds.num_users, ds.num_items),
                               BatchSettings(batch_size=16, shuffle_buffer=30))
    shard = copy / ds.corpus_entry("content")["shards"][3]["path"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # after setup: a half-written shard
    with pytest.raises(ShardError, match=rf"{shard.name}: \d+ bytes, sha256 .* partial"):
        for step in range(b.steps_per_epoch):
            b.batch(0, step)
