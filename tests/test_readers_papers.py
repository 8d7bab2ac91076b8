"""The papers' own data: split-npz (the CLLM4Rec authors' Beauty/Sports split), sequences-json (A-LLMRec's Video
Games), and S3-Rec sequences with --item-titles. Each through `cllm4rec preprocess`, its stats, a bad input's one
error line, and training on the output: CLLM4Rec on split-npz in one process and through the Ray launcher (2
workers, the same losses), A-LLMRec on sequences-json (the Ray path of a leave-one-out dataset, whose files the
three leave-one-out readers write alike, is test_allmrec_train.py's). The Ray and A-LLMRec runs are marked slow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from checks import one_line_error

from cllm4rec_dist.cli import main
from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.corpus.shards import ShardedDataset, load_eval_split
from cllm4rec_dist.data.protocol import ProtocolConfig, apply_protocol
from cllm4rec_dist.data.readers import ReaderOptions, read_dataset
from cllm4rec_dist.data.records import InputReport

SMALL = ["--min-shards", "2"]


def preprocess(*args: str) -> int:
    return main(["preprocess", *args, *SMALL])


def stats_of(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


# --- split-npz ------------------------------------------------------------------------------------------------------

USERS, ITEMS = 14, 16


def npz_split(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A random binary split over USERS x ITEMS: user 5 has no interaction at all, item 15 none; every other user
    has 6 train, 2 valid and 1 test items."""
    rng = np.random.default_rng(seed)
    dense = {part: np.zeros((USERS, ITEMS), np.float32) for part in ("train", "val", "test")}
    for u in range(USERS):
        if u == 5:
            continue
        items = rng.permutation(ITEMS - 1)[:9]
        dense["train"][u, items[:6]] = 1
        dense["val"][u, items[6:8]] = 1
        dense["test"][u, items[8]] = 1
    folder.mkdir(parents=True, exist_ok=True)
    for part, matrix in dense.items():
        sp.save_npz(folder / f"{part}_matrix.npz", sp.csr_matrix(matrix))
    (folder / "meta.json").write_text(json.dumps({"num_users": USERS, "num_items": ITEMS}))
    tags = {str(i): ["Beauty", f"tag{i}", " Face  "] for i in range(ITEMS)}
    tags["99"] = ["out of range"]  # counted: 1 of 17 entries is bad (< 10%)
    (folder / "item_tags.json").write_text(json.dumps(tags))
    return dense


def test_split_npz_is_used_as_given_with_tag_documents(tmp_path):
    dense = npz_split(tmp_path / "beauty")
    out = tmp_path / "ds"
    assert preprocess("--format", "split-npz", "--input", str(tmp_path / "beauty"), "--out", str(out)) == 0
    stats = stats_of(out)
    nnz = {part: int(m.sum()) for part, m in dense.items()}
    assert stats["split"] == "as given" and stats["format"] == "split-npz"
    assert (stats["num_users"], stats["num_items"]) == (USERS - 1, ITEMS)  # the empty user dropped, item 15 kept
    assert (stats["num_train"], stats["num_valid"], stats["num_test"]) == (nnz["train"], nnz["val"], nnz["test"])
    assert stats["num_interactions"] == sum(nnz.values()) and stats["kcore_dropped"] == 0
    assert stats["input"]["counted"] == {"users_without_interactions": 1}
    assert stats["input"]["skipped"] == {"unknown_item": 1}
    assert stats["num_content_documents"] == ITEMS and stats["users_train_only"] == 0
    manifest = ShardedDataset(str(out)).manifest
    assert manifest["split_source"] == "as given"
    assert manifest["protocol"]["kcore"] == 0 and manifest["protocol"]["binarize"] is False
    ids = json.loads((out / "id_maps.json").read_text())
    assert ids["items"] == [str(i) for i in range(ITEMS)] and "5" not in ids["users"]
    split = load_eval_split(str(out))
    for u, user in enumerate(ids["users"]):  # every user's three lists are exactly the matrices' rows
        for part, lists in (("train", split.train), ("val", split.valid), ("test", split.test)):
            assert sorted(int(ids["items"][i]) for i in lists[u]) == np.flatnonzero(dense[part][int(user)]).tolist()
    descriptions = json.loads((out / "items.json").read_text())["descriptions"]
    assert descriptions[3] == "Tags: Beauty, tag3, Face"


@pytest.mark.parametrize("damage, needles", [
    ("shape", ["val_matrix.npz: shape 14 x 15", "meta.json says num_users x num_items = 14 x 16"]),
    ("overlap", ["test_matrix.npz: 1 (user, item) pairs are also in", "train_matrix.npz", "different splits"]),
    ("value", ["train_matrix.npz: entry (user 0, item", "is 2.0", "binary"]),
    ("objects", ["train_matrix.npz: holds Python objects", "never unpickled"]),
    ("meta", ["meta.json: num_items is '16', not a whole number > 0"]),
    ("missing", ["test_matrix.npz: missing; --format split-npz reads a folder"]),
])
def test_split_npz_bad_input_is_one_line(tmp_path, capsys, damage, needles):
    folder = tmp_path / "bad"
    dense = npz_split(folder)
    if damage == "shape":
        sp.save_npz(folder / "val_matrix.npz", sp.csr_matrix(dense["val"][:, :-1]))
    elif damage == "overlap":
        u, i = np.argwhere(dense["train"])[0]
        test = dense["test"].copy()
        test[u, i] = 1
        sp.save_npz(folder / "test_matrix.npz", sp.csr_matrix(test))
    elif damage == "value":
        train = dense["train"].copy()
        train[0][train[0] > 0] = 2
        sp.save_npz(folder / "train_matrix.npz", sp.csr_matrix(train))
    elif damage == "objects":  # what a pickled payload looks like inside an .npz: never loaded
        np.savez(folder / "train_matrix.npz", data=np.array([{"x": 1}], dtype=object), format=np.array("csr"),
                 shape=np.array([USERS, ITEMS]), indices=np.zeros(1, np.int32), indptr=np.zeros(USERS + 1, np.int32))
    elif damage == "meta":
        (folder / "meta.json").write_text(json.dumps({"num_users": USERS, "num_items": "16"}))
    elif damage == "missing":
        (folder / "test_matrix.npz").unlink()
    assert preprocess("--format", "split-npz", "--input", str(folder), "--out", str(tmp_path / "ds")) == 2
    one_line_error(capsys, *needles)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_split_npz_tags_of_unknown_items_reject_the_file_when_too_many(tmp_path, capsys):
    folder = tmp_path / "tags"
    npz_split(folder)
    (folder / "item_tags.json").write_text(json.dumps({str(i): ["t"] for i in range(ITEMS, 2 * ITEMS)}))
    assert preprocess("--format", "split-npz", "--input", str(folder), "--out", str(tmp_path / "ds")) == 2
    one_line_error(capsys, "item_tags.json: 16 of 16 lines are bad", "unknown_item", "wrong --format")


SPLIT_RUN = ["--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "1", "--schedule.finetune_epochs", "1",
             "--schedule.finetune_content_fraction", "0", "--batch.max_length", "64", "--log_every", "1000"]


@pytest.fixture(scope="module")
def split_npz_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split_npz")
    npz_split(root / "raw")
    assert preprocess("--format", "split-npz", "--input", str(root / "raw"), "--out", str(root / "ds")) == 0
    return root / "ds"


@pytest.fixture(scope="module")
def split_npz_run(split_npz_data, tmp_path_factory) -> Path:
    """One process standing in for 2 ranks: what the Ray workers must reproduce."""
    out = tmp_path_factory.mktemp("split_npz_run") / "run"
    assert main(["train", "--data", str(split_npz_data), "--out", str(out), "--simulate_ranks", "2", *SPLIT_RUN]) == 0
    return out


def test_cllm4rec_trains_and_ranks_the_full_catalogue_on_a_split_npz_dataset(split_npz_run):
    metrics = json.loads((split_npz_run / "metrics.json").read_text())
    for part in ("valid", "test"):
        assert 0 <= metrics[part]["recall@20"] <= 1 and metrics[part]["recall@20"] > 0  # 16 items: 20 covers all


@pytest.mark.slow
def test_ray_workers_train_on_a_split_npz_dataset_like_one_process(split_npz_data, split_npz_run, tmp_path):
    """The real launcher (Ray Train + DeepSpeed, 2 workers) reading the split-npz shards: the same per-step losses
    and test metrics as the single process standing in for 2 ranks."""
    from test_distributed import assert_same_losses, launch

    from cllm4rec_dist.train.monitor import read_train_log

    out = tmp_path / "ray"
    launch([sys.executable, "launchers/pretrain_llama.py", "--data", str(split_npz_data), "--dist.num_workers", "2",
            *SPLIT_RUN], out)
    assert_same_losses(out, read_train_log(split_npz_run))
    ray_test = json.loads((out / "metrics.json").read_text())["test"]
    one_test = json.loads((split_npz_run / "metrics.json").read_text())["test"]
    assert ray_test["num_users"] == one_test["num_users"]
    assert ray_test["recall@20"] == pytest.approx(one_test["recall@20"], abs=1e-6)
    assert (out / "export" / "export.json").is_file()


# --- S3-Rec sequences + --item-titles -------------------------------------------------------------------------------


def s3rec_file(path: Path, users: int = 12, items: int = 30) -> Path:
    rng = np.random.default_rng(1)
    lines = [" ".join([str(u)] + [str(i) for i in rng.permutation(np.arange(1, items + 1))[:6]])
             for u in range(1, users + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_s3rec_item_titles_from_a_json_map(tmp_path):
    seq = s3rec_file(tmp_path / "Beauty.txt")
    present = sorted({int(i) for line in seq.read_text().split("\n") if line for i in line.split()[1:]})
    titles = {str(i): {"asin": f"B{i:05d}", "title": f"Lipstick no. {i}"} for i in present}
    titles[str(present[0])] = {"asin": "B0", "title": None}  # untitled: shown by its id
    titles[str(present[1])] = f"Plain  string title {present[1]}"  # plain strings are accepted too
    titles["999"] = {"asin": "BX", "title": "not in the sequences"}  # counted as unknown_item
    (tmp_path / "items.json").write_text(json.dumps(titles))
    out = tmp_path / "ds"
    assert preprocess("--format", "s3rec", "--input", str(seq), "--item-titles", str(tmp_path / "items.json"),
                      "--split", "leave-one-out", "--kcore", "0", "--out", str(out)) == 0
    stats = stats_of(out)
    assert stats["items_without_title"] == 1 + stats["num_items"] - len(present)
    assert stats["input"]["skipped"] == {"unknown_item": 1}
    data = SequentialData.open(str(out))
    ids = json.loads((out / "id_maps.json").read_text())["items"]
    shown = dict(zip(ids, data.titles))
    assert shown[str(present[0])] == str(present[0]) and shown[str(present[1])] == f"Plain string title {present[1]}"
    assert shown[str(present[2])] == f"Lipstick no. {present[2]}"
    assert all(len(c) == 20 for c in data.candidates["test"] if c is not None)


def test_s3rec_item_titles_of_another_dataset_are_refused(tmp_path, capsys):
    seq = s3rec_file(tmp_path / "Beauty.txt")
    (tmp_path / "other.json").write_text(json.dumps({str(i): f"t{i}" for i in range(500, 520)}))
    assert preprocess("--format", "s3rec", "--input", str(seq), "--item-titles", str(tmp_path / "other.json"),
                      "--out", str(tmp_path / "ds")) == 2
    one_line_error(capsys, "other.json: 20 of 20 lines are bad", "other.json item '500': unknown_item")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert preprocess("--format", "s3rec", "--input", str(seq), "--item-titles", str(tmp_path / "list.json"),
                      "--out", str(tmp_path / "ds")) == 2
    one_line_error(capsys, "list.json: holds a JSON list, not an object")
    assert preprocess("--format", "s3rec", "--input", str(seq), "--item-titles", str(tmp_path / "other.json"),
                      "--out", str(tmp_path / "ds"), "--strict") == 2
    one_line_error(capsys, "other.json item '500': unknown_item", "Fix or delete the entry")
    assert preprocess("--format", "table", "--input", str(seq), "--item-titles", str(tmp_path / "other.json"),
                      "--out", str(tmp_path / "ds")) == 2
    one_line_error(capsys, "--item-titles is read by --format s3rec only, not table")


# --- sequences-json -------------------------------------------------------------------------------------------------


def sequences_folder(folder: Path, users: int = 12, items: int = 40) -> dict:
    rng = np.random.default_rng(2)
    parts = {"train": {}, "val": {}, "test": {}}
    for u in range(1, users + 1):
        seq = [int(i) for i in rng.permutation(np.arange(1, items + 1))[:7]]
        parts["train"][str(u)], parts["val"][str(u)], parts["test"][str(u)] = seq[:5], seq[5:6], seq[6:7]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sequences.json").write_text(json.dumps(parts))
    present = sorted({i for part in parts.values() for seq in part.values() for i in seq})
    (folder / "titles.json").write_text(json.dumps({str(i): f"Game {i}" for i in present}))
    (folder / "id_maps.json").write_text(json.dumps({"umap": {}, "smap": {}}))
    return parts


def test_sequences_json_leave_one_out_as_given_with_stored_candidates(tmp_path):
    parts = sequences_folder(tmp_path / "games")
    parts["train"]["3"] = parts["train"]["3"] + [parts["train"]["3"][0]]  # a repeat: merged, the latest wins
    parts["train"]["13"] = [1, 2, 3]  # no held-out items: train only
    (tmp_path / "games" / "sequences.json").write_text(json.dumps(parts))
    out = tmp_path / "ds"
    assert preprocess("--format", "sequences-json", "--input", str(tmp_path / "games"), "--out", str(out)) == 0
    stats = stats_of(out)
    assert stats["split"] == "as given" and stats["duplicates_merged"] == 1 and stats["items_without_title"] == 0
    assert (stats["num_users"], stats["num_valid"], stats["num_test"], stats["users_evaluated"]) == (13, 12, 12, 12)
    assert stats["num_train"] == 12 * 5 + 3 and stats["input"]["skipped"] == {}
    assert ShardedDataset(str(out)).manifest["protocol"]["split"] == "leave-one-out"
    data = SequentialData.open(str(out))
    ids = json.loads((out / "id_maps.json").read_text())
    items, users = ids["items"], ids["users"]
    for u, user in enumerate(users):
        history = [int(items[i]) for i in data.histories[u]]
        expected = parts["train"][user]
        if user == "3":
            expected = expected[1:]  # the repeated first item now sits at the end
        assert history == expected
        if user in parts["val"]:
            assert int(items[data.valid[u]]) == parts["val"][user][0]
            assert int(items[data.test[u]]) == parts["test"][user][0]
            row = data.candidates["test"][u]
            assert len(row) == 20 and data.test[u] in row
            known = set(parts["train"][user]) | {parts["val"][user][0], parts["test"][user][0]}
            assert not {int(items[i]) for i in row} - {parts["test"][user][0]} & known
        else:
            assert data.valid[u] is None and data.candidates["test"][u] is None
    assert data.titles == [f"Game {i}" for i in items]


def test_sequences_json_bad_users_are_counted_and_a_broken_file_is_one_line(tmp_path, capsys):
    parts = sequences_folder(tmp_path / "games", users=12)
    parts["val"]["2"] = [5, 6]  # not leave-one-out: the user is skipped and counted (1 of 12)
    (tmp_path / "games" / "sequences.json").write_text(json.dumps(parts))
    out = tmp_path / "ds"
    assert preprocess("--format", "sequences-json", "--input", str(tmp_path / "games"), "--out", str(out)) == 0
    skipped = stats_of(out)["input"]["skipped"]  # + the titles of items only that user held: unknown now
    assert skipped.pop("not_leave_one_out") == 1 and set(skipped) <= {"unknown_item"}
    assert stats_of(out)["num_users"] == 11
    parts["test"]["4"] = "x"
    parts["test"]["99"] = [1]
    (tmp_path / "games" / "sequences.json").write_text(json.dumps(parts))
    assert preprocess("--format", "sequences-json", "--input", str(tmp_path / "games"), "--out", str(out)) == 2
    one_line_error(capsys, "sequences.json: 3 of 13 lines are bad", "unknown_user", "wrong --format")
    del parts["test"]
    (tmp_path / "games" / "sequences.json").write_text(json.dumps(parts))
    assert preprocess("--format", "sequences-json", "--input", str(tmp_path / "games"), "--out", str(out)) == 2
    one_line_error(capsys, "sequences.json: part 'test' is missing, not an object {user: [item ids]}")


def test_split_npz_refuses_a_leave_one_out_re_split(tmp_path, capsys):
    npz_split(tmp_path / "raw")
    assert preprocess("--format", "split-npz", "--input", str(tmp_path / "raw"), "--split", "leave-one-out",
                      "--out", str(tmp_path / "ds")) == 2
    one_line_error(capsys, "the data holds a random split, used as given; --split leave-one-out would need a re-split")


# --- the real data (shared/data beside the checkout; skipped where it is absent) ------------------------------------


def read_real(fmt: str, path: Path, **options):
    return read_dataset(fmt, ReaderOptions(inputs=[str(path)], **options), InputReport())


def test_the_papers_counts_on_the_real_data(shared_data):
    folder = shared_data / "amazon-cllm4rec-split" / "beauty"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    beauty = apply_protocol(read_real("split-npz", folder), ProtocolConfig(binarize=False, kcore=0))
    assert (beauty.num_users, beauty.num_items) == (10_553, 6_086)
    assert (beauty.stats["num_train"], beauty.stats["num_valid"], beauty.stats["num_test"]) == (70_614, 11_767, 11_767)
    assert len(beauty.item_texts) == 6_086 and beauty.item_texts[0].startswith("Tags: Beauty, Face, Mineral")
    games = apply_protocol(read_real("sequences-json", shared_data / "amazon-2014-titles" / "games"),
                           ProtocolConfig(split="leave-one-out", binarize=False, kcore=0))
    assert (games.num_users, games.num_items, games.stats["num_interactions"]) == (15_264, 7_676, 147_861)
    assert games.stats["duplicates_merged"] == 0 and len(games.item_titles) == 7_676
    titled = read_real("s3rec", shared_data / "amazon-5core-seq-s3rec" / "Beauty.txt",
                       item_titles=str(shared_data / "amazon-2014-titles" / "beauty_items.json"))
    assert len(titled.item_titles) == 12_086 and not titled.report.skipped


@pytest.mark.slow
def test_allmrec_trains_on_a_sequences_json_dataset_with_its_titles(tmp_path):
    """Every A-LLMRec stage on the given leave-one-out split: the candidates are the stored ones, the titles the
    file's."""
    sequences_folder(tmp_path / "games", users=30, items=40)
    data = tmp_path / "ds"
    assert preprocess("--format", "sequences-json", "--input", str(tmp_path / "games"), "--out", str(data)) == 0
    config = tmp_path / "allmrec.yaml"
    config.write_text(f"data: {data}\nrecommender: allmrec\nallmrec:\n  cf_epochs: 1\n  cf_dim: 16\n  cf_max_len: 8\n"
                      "  stage1_epochs: 1\n  stage2_epochs: 1\n  prompt_history: 3\n  num_candidates: 5\n"
                      "  max_new_tokens: 8\n  eval_batch_size: 30\nlog_every: 1000\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for model in ("allmrec", "titles_only"):  # ranked among the 20 stored candidates of every user
        for part in ("valid", "test"):
            assert metrics["stages"]["llm"][model][part]["users"] == 30
            assert 0 <= metrics["stages"]["llm"][model][part]["hit@10"] <= 1
