"""The leave-one-out protocol, stored candidates, item titles, the seq corpus and its reader."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
from cllm4rec_dist.corpus.sequences import SequentialData, items_table
from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
from cllm4rec_dist.data.protocol import ProtocolConfig, apply_protocol
from cllm4rec_dist.data.readers import ReaderOptions, read_dataset
from cllm4rec_dist.data.records import InputError, InputReport, RawDataset

LOO = dict(split="leave-one-out", kcore=0, binarize=False)


def raw_of(rows) -> RawDataset:
    return RawDataset("tiny", RawDataset.frame([(u, i, 5.0, t, "") for u, i, t in rows]))


def as_lists(split, u):
    return [split.item_ids[i] for i in split.train[u]], [split.item_ids[i] for i in split.valid[u]], \
        [split.item_ids[i] for i in split.test[u]]


def test_leave_one_out_follows_time_then_file_order_and_skips_short_users():
    rows = [("a", "i1", 5), ("a", "i2", 1), ("a", "i3", 4), ("a", "i4", 2), ("a", "i5", 3),   # time order != file order
            ("b", "i1", 1), ("b", "i2", 2),                                                 # 2 interactions: train only
            ("c", "i3", math.nan), ("c", "i1", math.nan), ("c", "i2", math.nan),            # no timestamps: file order
            ("d", "i6", 1), ("d", "i7", 2)]                                                 # negatives for user a
    split = apply_protocol(raw_of(rows), ProtocolConfig(num_negatives=1, **LOO))
    users = {name: k for k, name in enumerate(split.user_ids)}
    assert as_lists(split, users["a"]) == (["i2", "i4", "i5"], ["i3"], ["i1"])
    assert as_lists(split, users["b"]) == (["i1", "i2"], [], [])
    assert as_lists(split, users["c"]) == (["i3"], ["i1"], ["i2"])
    assert split.stats["users_train_only"] == 2 and split.stats["users_evaluated"] == 2
    assert split.candidates["valid"][users["b"]] is None and split.candidates["test"][users["b"]] is None


def sequential_raw(seed=0, users=50, items=120, per_user=15) -> RawDataset:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for k, i in enumerate(rng.choice(items, size=per_user, replace=False)):
            rows.append((f"u{u}", f"i{i}", float(rng.integers(1, 6)), float(1000 * u + k), ""))
    return RawDataset("seq", RawDataset.frame(rows))


def test_candidates_are_the_positive_and_never_interacted_items_in_a_seeded_order():
    raw = sequential_raw()
    cfg = ProtocolConfig(split="leave-one-out", kcore=2)
    split = apply_protocol(raw, cfg)
    item_index = {item: j for j, item in enumerate(split.item_ids)}
    positions = []
    for u, user in enumerate(split.user_ids):
        # every item the user ever rated counts, low ratings (dropped by binarising) included
        touched = {item_index[i] for i in raw.interactions.item[raw.interactions.user == user] if i in item_index}
        for part in ("valid", "test"):
            candidates, held_out = split.candidates[part][u], getattr(split, part)[u]
            if len(held_out) == 0:
                assert candidates is None
                continue
            assert len(candidates) == 20 and len(set(candidates.tolist())) == 20
            positive = int(held_out[0])
            assert positive in candidates
            assert not (set(candidates.tolist()) - {positive}) & touched
            positions.append(int(np.flatnonzero(candidates == positive)[0]))
    assert len(positions) > 40 and len(set(positions)) > 5  # the positive is not always first
    again = apply_protocol(raw, cfg)
    other_split_seed = apply_protocol(raw, ProtocolConfig(split="leave-one-out", kcore=2, seed=7))
    other = apply_protocol(raw, ProtocolConfig(split="leave-one-out", kcore=2, candidate_seed=1))
    for part in ("valid", "test"):
        for a, b, c, _d in zip(split.candidates[part], again.candidates[part], other_split_seed.candidates[part],
                              other.candidates[part]):
            assert (a is None and b is None) or (np.array_equal(a, b) and np.array_equal(a, c))
        assert any(a is not None and not np.array_equal(a, d)
                   for a, d in zip(split.candidates[part], other.candidates[part]))


def test_too_few_items_for_the_negatives_is_a_clear_error():
    rows = [("a", f"i{k}", float(k)) for k in range(5)] + [("b", "i0", 0.0)]
    with pytest.raises(InputError, match=r"user 'a'.*--num-negatives 19"):
        apply_protocol(raw_of(rows), ProtocolConfig(**LOO))
    with pytest.raises(ValueError, match="protocol.split"):
        apply_protocol(raw_of(rows), ProtocolConfig(split="last-one"))


def test_random_split_is_unchanged_and_has_no_candidates():
    split = apply_protocol(sequential_raw(per_user=30), ProtocolConfig(kcore=2, binarize=False))
    assert not split.candidates
    assert all(len(v) == 3 and len(t) == 3 for v, t in zip(split.valid, split.test))  # 10% shares, not one item


# --- preprocessing and the reader ----------------------------------------------------------------------


def test_seq_corpus_matches_the_split_and_reads_back(demo_loo_data, demo_data):
    data = SequentialData.open(demo_loo_data)
    ds = ShardedDataset(demo_loo_data)
    assert ds.manifest["protocol"]["split"] == "leave-one-out" and "items.json" in ds.manifest["files"]
    eval_docs = ds.read_corpus("eval")  # CLLM4Rec's corpora are built on the same split
    for u, doc in enumerate(eval_docs):
        assert doc["train"] == data.histories[u]
        assert doc["valid"] == ([data.valid[u]] if data.valid[u] is not None else [])
        assert doc["test"] == ([data.test[u]] if data.test[u] is not None else [])
        for part in ("valid", "test"):
            if data.candidates[part][u] is not None:
                assert getattr(data, part)[u] in data.candidates[part][u]
    assert data.prefix(0, "test") == data.histories[0] + [data.valid[0]]
    counts = np.bincount(np.concatenate(data.histories), minlength=data.num_items)
    assert data.train_counts == counts.tolist()
    assert len(data.titles) == data.num_items and all(t.startswith("The ") for t in data.titles)
    assert "space" in " ".join(data.titles) and all(data.descriptions)
    parts = [data.partition(r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(data.num_users))
    assert len(data.evaluated_users("test")) == ds.manifest["num_users"]  # demo users all have >= 8 items
    with pytest.raises(ShardError, match="--split leave-one-out"):
        SequentialData.open(demo_data)


def test_preprocessing_is_identical_when_rerun(demo_raw, demo_loo_data, tmp_path):
    out = str(tmp_path / "again")
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[demo_raw]), out=out,
                                protocol=ProtocolConfig(split="leave-one-out")))
    first, second = ShardedDataset(demo_loo_data).manifest, ShardedDataset(out).manifest
    assert first["content_hash"] == second["content_hash"]
    assert first["corpora"]["seq"] == second["corpora"]["seq"]


def test_movielens_100k_leave_one_out_holds_out_each_users_latest_items(tmp_path, shared_data):
    from cllm4rec_dist.cli import main

    out = tmp_path / "ml"
    assert main(["preprocess", "--format", "movielens", "--input", str(shared_data / "movielens-100k"),
                 "--split", "leave-one-out", "--out", str(out), "--min-shards", "2"]) == 0
    data = SequentialData.open(str(out))
    ids = json.loads((out / "id_maps.json").read_text())
    ratings = pd.read_csv(shared_data / "movielens-100k" / "u.data", sep="\t", header=None,
                          names=["user", "item", "rating", "ts"], usecols=range(4), dtype=str).dropna()
    ratings["ts"] = ratings.ts.astype(float)
    stamp = {(r.user, r.item): r.ts for r in ratings.itertuples()}
    touched = ratings.groupby("user").item.agg(set)
    assert data.num_users == 938 and data.num_items == 1008
    assert sum(v is not None for v in data.test) == 938
    for u in range(0, data.num_users, 37):
        user = ids["users"][u]
        times = [stamp[user, ids["items"][i]] for i in data.histories[u]]
        valid_t, test_t = stamp[user, ids["items"][data.valid[u]]], stamp[user, ids["items"][data.test[u]]]
        assert times == sorted(times) and max(times) <= valid_t <= test_t
        negatives = {ids["items"][i] for i in data.candidates["test"][u]} - {ids["items"][data.test[u]]}
        assert len(negatives) == 19 and not negatives & touched[user]
    assert data.titles[0] == "Toy Story (1995)"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["items_without_title"] == 0 and stats["users_evaluated"] == 938


# --- item titles from every reader --------------------------------------------------------------------


def read(fmt, *inputs, **options):
    return read_dataset(fmt, ReaderOptions(inputs=[str(p) for p in inputs], **options), InputReport())


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_movielens_titles(tmp_path):
    folder = tmp_path / "ml-100k"
    write(folder / "u.data", "196\t1\t3\t881250949\n186\t2\t4\t891717742\n")
    write(folder / "u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1" + "|0" * 13 + "\n"
          "2|Caf\xe9 (1996)|01-Jan-1996||http://y|1" + "|0" * 18 + "\n", encoding="latin-1")
    assert read("movielens", folder).item_titles == {"1": "Toy Story (1995)", "2": "Caf\xe9 (1996)"}
    zpath = tmp_path / "latest.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("ml/ratings.csv", "userId,movieId,rating,timestamp\n1,11,4.5,9\n")
        z.writestr("ml/movies.csv", 'movieId,title,genres\n11,"American President, The (1995)",Comedy|Drama\n')
    latest = read("movielens", zpath)
    assert latest.item_titles == {"11": "American President, The (1995)"}
    assert latest.item_texts == {"11": "American President, The (1995). Genres: Comedy, Drama"}


def test_amazon_meta_titles(tmp_path):
    reviews = write(tmp_path / "r.json", json.dumps({"reviewerID": "u", "asin": "a1", "overall": 5}) + "\n"
                    + json.dumps({"reviewerID": "u", "asin": "a2", "overall": 4}) + "\n")
    meta = write(tmp_path / "m.json",
                 json.dumps({"asin": "a1", "title": " Soap  Bar ", "description": ["Mild."]}) + "\n"
                 + json.dumps({"asin": "a2", "description": "No title."}) + "\n")
    ds = read("amazon", reviews, meta=[str(meta)])
    assert ds.item_titles == {"a1": "Soap Bar"} and ds.item_texts == {"a1": "Soap Bar. Mild.", "a2": "No title."}


def test_table_titles_from_a_column_and_from_items_csv(tmp_path):
    path = write(tmp_path / "t.csv", "user,item,item_title\nu1,i1,\nu2,i1,First\nu2,i2,Second\n")
    assert read("table", path).item_titles == {"i1": "First", "i2": "Second"}
    assert read("table", path, item_title_col="nope").item_titles == {}
    folder = tmp_path / "raw"
    write(folder / "interactions.csv", "user,item\nu1,i1\nu1,i2\n")
    write(folder / "items.csv", "item,item_title,item_text\ni1,Green Tea,A tea.\ni2,,Plain.\n")
    ds = read("table", folder)
    assert ds.item_titles == {"i1": "Green Tea"} and ds.item_texts == {"i1": "A tea.", "i2": "Plain."}


def test_demo_titles_name_the_topic_and_are_unique():
    from cllm4rec_dist.data.demo import TOPICS, DemoConfig, generate

    _, _, items = generate(DemoConfig(num_users=20, num_items=150))
    titles = [title for _, title, _ in items]
    assert len(set(titles)) == len(titles)
    for _, title, text in items:
        topic = text.split()[1]  # "A <topic> <noun> about ..."
        assert topic in TOPICS and f"a {topic} " in title


def test_items_without_titles_fall_back_to_their_original_id(tmp_path):
    path = write(tmp_path / "Beauty.txt", "1 10 11 12\n2 13 14\n")
    split = apply_protocol(read("s3rec", path), ProtocolConfig(split="leave-one-out", kcore=0, num_negatives=1))
    assert items_table(split)["titles"] == ["10", "11", "12", "13", "14"]



def test_cllm4rec_batches_build_on_the_leave_one_out_split(demo_loo_data):
    """CLLM4Rec's corpora are unchanged in form; a full `cllm4rec train` on this split is run in docs (too slow
    here)."""
    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.recommenders.cllm4rec.batches import BatchSettings, CorpusBatches

    ds = ShardedDataset(demo_loo_data)
    space = TokenSpace(ds.vocab_size, ds.num_users, ds.num_items)
    for name in ("collab", "content", "rec"):
        batches = CorpusBatches.for_rank(ds, name, space, BatchSettings(batch_size=4, max_length=64), rank=1, world=2)
        assert batches.batch(0, batches.steps_per_epoch - 1).lengths.shape[0] == 4  # 4 documents, however packed
