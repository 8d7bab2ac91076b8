"""The RecBole atomic-file reader: same dataset as the table format -> same statistics and shards."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
from cllm4rec_dist.data.readers import ReaderOptions, read_dataset
from cllm4rec_dist.data.records import InputError, InputReport, clean_text


def write_atomic(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def demo_as_recbole(table_dir: Path, out: Path) -> None:
    """The demo folder (interactions.csv, users.csv, items.csv) as RecBole's demo.inter/.user/.item."""
    def rows(name):
        with open(table_dir / name, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))

    out.mkdir(parents=True)
    write_atomic(out / "demo.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float",
                                      "review:token_seq"],
                 [[r["user"], r["item"], r["rating"], r["timestamp"], clean_text(r["review"])]
                  for r in rows("interactions.csv")])
    write_atomic(out / "demo.user", ["user_id:token", "user_text:token_seq"],
                 [[r["user"], clean_text(r["user_text"])] for r in rows("users.csv")])
    write_atomic(out / "demo.item", ["item_id:token", "item_title:token_seq", "item_text:token_seq"],
                 [[r["item"], clean_text(r["item_title"]), clean_text(r["item_text"])] for r in rows("items.csv")])


def shard_digests(ds: Path) -> dict[str, list[str]]:
    manifest = json.loads((ds / "manifest.json").read_text())
    return {name: [s["sha256"] for s in corpus["shards"]] for name, corpus in manifest["corpora"].items()}


def test_recbole_copy_of_the_demo_preprocesses_to_the_same_statistics_and_shards(demo_raw, tmp_path):
    table = tmp_path / "table" / "demo"
    shutil.copytree(demo_raw, table)
    demo_as_recbole(table, tmp_path / "recbole" / "demo")
    outs = {}
    for fmt, source in (("table", table), ("recbole", tmp_path / "recbole" / "demo")):
        outs[fmt] = tmp_path / f"shards-{fmt}"
        preprocess(PreprocessConfig(format=fmt, options=ReaderOptions(inputs=[str(source)]), out=str(outs[fmt])))
    stats = {fmt: json.loads((out / "stats.json").read_text()) for fmt, out in outs.items()}
    assert stats["recbole"].pop("format") == "recbole" and stats["table"].pop("format") == "table"
    assert stats["recbole"] == stats["table"]
    assert stats["table"]["user_texts"] > 0 and stats["table"]["item_texts"] > 0 and stats["table"]["train_reviews"] > 0
    assert shard_digests(outs["recbole"]) == shard_digests(outs["table"])
    for name in ("id_maps.json", "items.json"):  # original ids; titles, descriptions, counts
        assert (outs["recbole"] / name).read_text() == (outs["table"] / name).read_text()


ML100K_ITEM = ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]


@pytest.fixture
def ml_style(tmp_path) -> Path:
    """A small ml-100k-shaped atomic dataset (RecBole's own field names and types)."""
    folder = tmp_path / "ml-mini"
    folder.mkdir()
    write_atomic(folder / "ml-mini.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
                 [["196", "242", "3", "881250949"], ["186", "302", "3", "891717742"], ["196", "302", "5", "881250950"]])
    write_atomic(folder / "ml-mini.item", ML100K_ITEM,
                 [["242", "Kolya", "1996", "Comedy"], ["302", "L.A. Confidential", "1997", "Crime Film-Noir Mystery"]])
    write_atomic(folder / "ml-mini.user", ["user_id:token", "age:token", "gender:token"], [["196", "49", "M"]])
    return folder


def test_recbole_reads_titles_texts_ratings_and_timestamps(ml_style):
    raw = read_dataset("recbole", ReaderOptions(inputs=[str(ml_style / "ml-mini.inter")]), InputReport())
    assert raw.name == "ml-mini" and raw.has_ratings
    assert raw.interactions[["user", "item"]].values.tolist() == [["196", "242"], ["186", "302"], ["196", "302"]]
    assert raw.interactions["rating"].tolist() == [3.0, 3.0, 5.0]
    assert raw.interactions["timestamp"].tolist()[0] == 881250949.0
    assert raw.item_titles == {"242": "Kolya", "302": "L.A. Confidential"}
    assert raw.item_texts["302"] == "L.A. Confidential. Crime Film-Noir Mystery"  # title + token_seq fields
    assert raw.user_texts == {}  # the .user file has only :token fields: no bio
    assert raw.report.lines_read == 3 + 2 + 1


def test_recbole_bad_input_rules(ml_style, tmp_path):
    inter = ml_style / "ml-mini.inter"
    lines = inter.read_text().splitlines()
    rows = [["1", "242", "4", "5"]] * 40
    write_atomic(inter, lines[0].split("\t"), [line.split("\t") for line in lines[1:]] + rows
                 + [["2", "242", "five", "6"], ["", "242", "4", "7"], ["3", "242", "4"]])
    report = InputReport()
    raw = read_dataset("recbole", ReaderOptions(inputs=[str(ml_style)]), report)
    assert len(raw.interactions) == 43
    assert dict(report.skipped) == {"non_numeric_rating": 1, "empty_id": 1, "wrong_field_count": 1}
    assert report.examples[0] == f"{inter}:45: non_numeric_rating (rating='five')"
    with pytest.raises(InputError, match=rf"{inter}:45: non_numeric_rating .*--strict"):
        read_dataset("recbole", ReaderOptions(inputs=[str(ml_style)]), InputReport(strict=True))

    # A header that is not RecBole's, or a required field with the wrong type, fails before any line is read.
    bad = tmp_path / "bad"
    bad.mkdir()
    write_atomic(bad / "x.inter", ["user_id", "item_id"], [["1", "2"]])
    with pytest.raises(InputError, match=r"x.inter: header field 'user_id' is not name:type"):
        read_dataset("recbole", ReaderOptions(inputs=[str(bad)]), InputReport())
    write_atomic(bad / "x.inter", ["user_id:token", "item_id:float"], [["1", "2"]])
    with pytest.raises(InputError, match=r"x.inter: field 'item_id' has type 'float'; expected token"):
        read_dataset("recbole", ReaderOptions(inputs=[str(bad)]), InputReport())
    write_atomic(bad / "x.inter", ["uid:token", "item_id:token"], [["1", "2"]])
    with pytest.raises(InputError, match=r"x.inter: no field 'user_id'; the header is uid:token, item_id:token"):
        read_dataset("recbole", ReaderOptions(inputs=[str(bad)]), InputReport())
    with pytest.raises(InputError, match=r"needs exactly one <name>.inter file \(found: none\)"):
        read_dataset("recbole", ReaderOptions(inputs=[str(tmp_path)]), InputReport())
