"""Trust (issue 32), the data-input part of the trust test matrix, through the real commands (`cllm4rec preprocess`,
`cllm4rec train`, `cllm4rec baselines`) on files crafted here. Categories:

* candidates: the stored leave-one-out candidates (the ``seq`` corpus) are checked where they are drawn and
  written, and again when they are read: fixed length, unique, exactly one positive (the held-out item), no item
  of the user's history, ids in range; a bad file is refused before any training, naming the file, the user row
  and the field;
* manifest: fields of manifest.json that the trainers and baselines use (``cold_items``, ``protocol``, ...) are
  checked when the manifest is read;
* sidecars: a stage-0 CF model folder's ``cf_model.json`` is checked field by field, and against the shapes in
  the safetensors header, before any tensor of the model is allocated;
* tables: a second, conflicting row for one item (or user) in a side table is a bad line like any other.

Every refusal is one line naming the file (and line or field) and exits 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checks import one_line_error  # noqa: E402

from cllm4rec_dist.cli import main as cli
from cllm4rec_dist.corpus.sequences import SEQ_CORPUS, SequentialData
from cllm4rec_dist.corpus.shards import MANIFEST, ShardedDataset, ShardError, sha256, shard_bytes

ALLMREC = """
recommender: allmrec
allmrec:
  cf_model: sasrec
  cf_epochs: 2
  cf_patience: 1
  cf_dim: 8
  cf_max_len: 10
  stage1_epochs: 1
  stage2_epochs: 1
  prompt_history: 3
  num_candidates: 5
  max_new_tokens: 8
  eval_max_users: 10
  generate: false
  titles_only_baseline: false
log_every: 1000
"""


def allmrec_config(tmp_path: Path, data: str, cf_from: Path | None = None) -> Path:
    path = tmp_path / "allmrec.yaml"
    text = ALLMREC if cf_from is None else ALLMREC.replace("allmrec:\n", f"allmrec:\n  cf_from: {cf_from}\n")
    path.write_text(f"data: {data}\n{text}")
    return path


# --------------------------------------------------------------------------- candidates


def rewrite_seq(source: str, to: Path, change) -> str:
    """A copy of a leave-one-out dataset whose seq documents ``change(docs)`` edited (in place, by user index);
    the shards are rewritten and the manifest's sizes and checksums follow, as someone editing the files would."""
    shutil.copytree(source, to)
    manifest = json.loads((to / MANIFEST).read_text())
    data = ShardedDataset(str(to))
    docs = data.read_corpus(SEQ_CORPUS)
    change(docs)
    start = 0
    for entry in manifest["corpora"][SEQ_CORPUS]["shards"]:
        blob = shard_bytes(SEQ_CORPUS, start, docs[start:start + entry["num_docs"]])
        (to / entry["path"]).write_bytes(blob)
        entry.update(bytes=len(blob), sha256=sha256(blob))
        start += entry["num_docs"]
    (to / MANIFEST).write_text(json.dumps(manifest))
    return str(to)


def shard_of(data: str, user: int) -> str:
    """The seq shard holding user ``user``'s document."""
    start = 0
    for entry in json.loads((Path(data) / MANIFEST).read_text())["corpora"][SEQ_CORPUS]["shards"]:
        if user < start + entry["num_docs"]:
            return entry["path"]
        start += entry["num_docs"]
    raise AssertionError(user)


@pytest.fixture(scope="module")
def loo(demo_loo_data) -> SequentialData:
    return SequentialData.open(demo_loo_data)


def evaluated_user(loo: SequentialData) -> int:
    """A user with valid and test candidates and a history of at least 3 items."""
    return next(u for u in loo.evaluated_users("test") if len(loo.histories[u]) >= 3
                and loo.candidates["valid"][u] is not None)


def negatives_at(row: list[int], positive: int) -> list[int]:
    return [k for k, item in enumerate(row) if item != positive]


def test_stored_candidates_are_checked_before_any_training(demo_loo_data, loo, tmp_path, capsys):
    u = evaluated_user(loo)
    valid, test = loo.valid[u], loo.test[u]
    history = loo.histories[u]

    def own_history(docs):  # the file that lifted most-popular's Hit@1 from 0.06 to 0.55: negatives the user knows
        row = docs[u]["test_candidates"]
        for k, pos in enumerate(negatives_at(row, test)[:3]):
            row[pos] = history[k]

    def repeated(docs):
        row = docs[u]["valid_candidates"]
        first, second = negatives_at(row, valid)[:2]
        row[second] = row[first]

    def no_positive(docs):
        row = docs[u]["test_candidates"]
        row[row.index(test)] = next(i for i in range(loo.num_items) if i not in row and i not in history
                                    and i not in (valid, test))

    def two_positives(docs):
        row = docs[u]["test_candidates"]
        row[negatives_at(row, test)[0]] = test

    def ragged(docs):
        row = docs[u]["test_candidates"]
        row.pop(negatives_at(row, test)[0])

    def previous_valid_item(docs):  # the valid item is part of the test prefix: never a test negative
        row = docs[u]["test_candidates"]
        row[negatives_at(row, test)[0]] = valid

    def not_an_id(docs):
        row = docs[u]["valid_candidates"]
        row[negatives_at(row, valid)[0]] = None

    def candidates_without_a_held_out_item(docs):
        docs[u]["valid"] = None

    cases = {  # name: (edit, the field named, a word of the reason)
        "own_history": (own_history, "test_candidates", "history"),
        "repeated": (repeated, "valid_candidates", "repeat"),
        "no_positive": (no_positive, "test_candidates", "positive"),
        "two_positives": (two_positives, "test_candidates", "positive"),
        "ragged": (ragged, "test_candidates", "every row has"),
        "previous_valid_item": (previous_valid_item, "test_candidates", "history"),
        "not_an_id": (not_an_id, "valid_candidates", "integer"),
        "candidates_without_a_held_out_item": (candidates_without_a_held_out_item, "valid", "valid_candidates"),
    }
    for name, (change, field, needle) in cases.items():
        crafted = rewrite_seq(demo_loo_data, tmp_path / name, change)
        out = tmp_path / f"{name}.json"
        assert cli(["baselines", "--data", crafted, "--model", "popular", "--out", str(out)]) == 2, name
        one_line_error(capsys, shard_of(crafted, u), f"user {u}", field, needle, "cllm4rec preprocess")
        assert not out.exists()

    # A-LLMRec refuses it on the driver (the Ray launcher's check) and in `cllm4rec train`, before stage 0
    from cllm4rec_dist.config import config_from_dict
    from cllm4rec_dist.recommenders import recommender

    crafted = str(tmp_path / "no_positive")
    with pytest.raises(ShardError, match=f"user {u}: test_candidates"):
        recommender("allmrec").check_data(config_from_dict({"data": crafted, "recommender": "allmrec"}),
                                          ShardedDataset(crafted))
    run = tmp_path / "run"
    assert cli(["train", "--config", str(allmrec_config(tmp_path, crafted)), "--out", str(run)]) == 2
    one_line_error(capsys, shard_of(crafted, u), f"user {u}", "test_candidates", "cllm4rec preprocess")
    assert not (run / "train_log.jsonl").exists() and not (run / "metrics.json").exists()
    # the untouched dataset is still read
    assert cli(["baselines", "--data", demo_loo_data, "--model", "popular", "--out", str(tmp_path / "ok.json")]) == 0


def test_candidates_are_checked_where_they_are_drawn_and_written(demo_raw, tmp_path, monkeypatch, capsys):
    """A sampling that returned an item the user knows (a bug, simulated here) never reaches the shards."""
    from cllm4rec_dist.data import candidates

    real = candidates.sample_negatives

    def leaky(rng, num_items, excluded, n):
        drawn = real(rng, num_items, excluded, n)
        drawn[0] = excluded[0]  # an item of the user's own
        return drawn

    monkeypatch.setattr(candidates, "sample_negatives", leaky)
    out = tmp_path / "ds"
    assert cli(["preprocess", "--format", "table", "--input", demo_raw, "--out", str(out),
                "--split", "leave-one-out", "--min-shards", "1"]) == 2
    one_line_error(capsys, "user", "valid_candidates", "bug")
    assert not (out / MANIFEST).exists()


# --------------------------------------------------------------------------- manifest


def edited_manifest(source: str, to: Path, **fields) -> str:
    shutil.copytree(source, to)
    manifest = json.loads((to / MANIFEST).read_text())
    manifest.update(fields)
    (to / MANIFEST).write_text(json.dumps(manifest))
    return str(to)


def test_manifest_fields_are_checked_when_the_manifest_is_read(demo_data, tmp_path, capsys):
    num_items = json.loads((Path(demo_data) / MANIFEST).read_text())["num_items"]
    bad = {"outside": [0, num_items + 3], "negative": [-1], "repeated": [2, 2], "not_a_list": "1,2",
           "not_ints": [1.5], "booleans": [True], "nested": [[1]]}
    for name, value in bad.items():
        crafted = edited_manifest(demo_data, tmp_path / name, cold_items=value)
        assert cli(["baselines", "--data", crafted, "--model", "popular", "--out", str(tmp_path / "p.json")]) == 2, \
            name
        one_line_error(capsys, str(Path(crafted) / MANIFEST), "cold_items", "cllm4rec preprocess")
    crafted = edited_manifest(demo_data, tmp_path / "protocol", protocol="leave-one-out")
    assert cli(["baselines", "--data", crafted, "--model", "popular", "--out", str(tmp_path / "p.json")]) == 2
    one_line_error(capsys, str(Path(crafted) / MANIFEST), "protocol")
    # the trainer refuses it before any step
    crafted = str(tmp_path / "outside")
    run = tmp_path / "run"
    assert cli(["train", "--data", crafted, "--out", str(run), "--ablation", "cf", "--schedule.warmup_epochs", "0",
                "--schedule.pretrain_epochs", "1", "--schedule.finetune_epochs", "1"]) == 2
    one_line_error(capsys, "manifest.json", "cold_items")
    assert not (run / "train_log.jsonl").exists()
    with pytest.raises(ShardError, match="cold_items"):
        ShardedDataset(crafted)
    # well-formed cold items still load
    fine = edited_manifest(demo_data, tmp_path / "fine", cold_items=[0, num_items - 1])
    assert ShardedDataset(fine).eval_split().cold_items.tolist() == [0, num_items - 1]


# --------------------------------------------------------------------------- sidecars


def edit_sidecar(folder: Path, change) -> None:
    """Edit cf_model.json and fix the folder's files record, as someone who controls the folder would."""
    from cllm4rec_dist.train.checkpoint import _local_fs, sha256_file

    info_path = folder / "cf_model.json"
    info = json.loads(info_path.read_text())
    change(info)
    info_path.write_text(json.dumps(info))
    record_path = folder / "files-rank0.json"
    record = json.loads(record_path.read_text())
    record["files"]["cf_model.json"] = {"bytes": info_path.stat().st_size,
                                        "sha256": sha256_file(_local_fs(), str(info_path))}
    record_path.write_text(json.dumps(record))


def test_cf_model_sidecar_fields_are_checked_before_the_model_is_built(demo_loo_data, loo, tmp_path, capsys):
    from cllm4rec_dist.baselines.sequential import save_cf_model
    from cllm4rec_dist.model.cf.sasrec import SASRec, SASRecSettings

    content_hash = loo.manifest["content_hash"]
    model = SASRec(loo.num_items, SASRecSettings(dim=8, max_len=10))

    def saved(name: str, change) -> Path:
        folder = tmp_path / name
        save_cf_model(model, str(folder), {"best_epoch": 1, "dataset": {"name": "demo", "content_hash": content_hash}})
        edit_sidecar(folder, change)
        return folder

    def setting(key, value):
        return lambda info: info["config"]["settings"].update({key: value})

    cases = {
        "huge_dim": (setting("dim", 2 ** 20), "dim"),  # allocated terabytes before the shape check
        "huge_max_len": (setting("max_len", 2 ** 40), "max_len"),
        "num_items": (lambda info: info["config"].update(num_items=2 ** 40), "num_items"),
        "fractional": (setting("dropout", "0.2"), "dropout"),
        "bool_dim": (setting("dim", True), "dim"),
        "unknown_setting": (setting("width", 3), "width"),
        "model": (lambda info: info["config"].update(model=["sasrec"]), "model"),
        "dataset": (lambda info: info.update(dataset="demo"), "dataset"),
        "best_epoch": (lambda info: info.update(best_epoch=-4), "best_epoch"),
        "mismatch": (setting("max_len", 12), "cf_model.safetensors"),
    }
    for name, (change, needle) in cases.items():
        folder = saved(name, change)
        config = allmrec_config(tmp_path, demo_loo_data, cf_from=folder)
        run = tmp_path / f"run-{name}"
        assert cli(["train", "--config", str(config), "--out", str(run)]) == 2, name
        one_line_error(capsys, str(folder / "cf_model.json"), needle)
        assert not (run / "metrics.json").exists()


# --------------------------------------------------------------------------- tables


def test_a_second_conflicting_row_for_one_item_in_items_csv_is_a_bad_line(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = ["user,item,rating"] + [f"u{u},i{(u * 3 + k) % 12},5" for u in range(10) for k in range(6)]
    (raw / "interactions.csv").write_text("\n".join(rows) + "\n")
    items = ["item,item_text,item_title"] + [f"i{i},about item {i},Item {i}" for i in range(24)]
    items.insert(5, "i2,about item 2,Item 2")         # line 6: the same row again: harmless
    items.insert(9, "i3,something else entirely,Item 3")  # line 10: another text for i3
    items.insert(11, "i7,about item 7,Another title")   # line 12: another title for i7
    (raw / "items.csv").write_text("\n".join(items) + "\n")

    out = tmp_path / "ds"
    assert cli(["preprocess", "--format", "table", "--input", str(raw), "--out", str(out), "--kcore", "0",
                "--min-shards", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input"]["skipped"] == {"conflicting_duplicate": 2}
    assert [e.split(": ")[0] for e in stats["input"]["examples"]] == [f"{raw / 'items.csv'}:10",
                                                                     f"{raw / 'items.csv'}:12"]
    # the first row of each item is kept
    items_json = ShardedDataset(str(out)).read_json("items.json")
    ids = json.loads((out / "id_maps.json").read_text())["items"]
    assert items_json["descriptions"][ids.index("i3")] == "about item 3"
    assert items_json["titles"][ids.index("i7")] == "Item 7"
    capsys.readouterr()
    # --strict names the first conflicting line
    assert cli(["preprocess", "--format", "table", "--input", str(raw), "--out", str(tmp_path / "strict"),
                "--strict"]) == 2
    one_line_error(capsys, f"{raw / 'items.csv'}:10: conflicting_duplicate", "i3")
