"""Raw-data readers: parsed fields, texts, and the bad-input rule, on tiny fixtures written to tmp_path."""

from __future__ import annotations

import gzip
import json
import math
import zipfile
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from cllm4rec_dist.data.readers import READERS, ReaderOptions, read_dataset
from cllm4rec_dist.data.records import InputError, InputReport


def read(fmt: str, *inputs, strict: bool = False, max_bad_fraction: float = 0.5, **options):
    report = InputReport(strict=strict, max_bad_fraction=max_bad_fraction)
    return read_dataset(fmt, ReaderOptions(inputs=[str(p) for p in inputs], **options), report)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def jsonl(records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def review(user="u1", item="i1", rating=5.0, summary="Great", text="Works well.", ts=1_000):
    return {"reviewerID": user, "asin": item, "overall": rating, "summary": summary, "reviewText": text,
            "unixReviewTime": ts}


# --- amazon -----------------------------------------------------------------------------------------


def test_amazon_plain_fields_and_review_text(tmp_path):
    path = write(tmp_path / "reviews.json", jsonl([
        review("u1", "i1", 5.0, "Great", "Works well.", 100),
        review("u2", "i1", 2.0, "Meh!", "Broke fast", 200),
        review("u2", "i2", 4.0, "", "Only text", 300),
        {"reviewerID": "u3", "asin": "i2", "overall": "3", "summary": "Only summary"},  # 2014: no reviewText, no time
    ]))
    ds = read("amazon", path)
    df = ds.interactions
    assert list(df.user) == ["u1", "u2", "u2", "u3"]
    assert list(df.item) == ["i1", "i1", "i2", "i2"]
    assert list(df.rating) == [5.0, 2.0, 4.0, 3.0]
    assert list(df.timestamp[:3]) == [100.0, 200.0, 300.0] and math.isnan(df.timestamp[3])
    assert list(df.review) == ["Great. Works well.", "Meh! Broke fast", "Only text", "Only summary"]
    assert ds.has_ratings and ds.name == "reviews"
    assert ds.report.lines_read == 4 and not ds.report.skipped


def test_amazon_gzip_by_suffix_and_by_magic_match_plain(tmp_path):
    text = jsonl([review("u1", "i1"), review("u2", "i2", 3.0)])
    plain = write(tmp_path / "a.json", text)
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "renamed.json").write_bytes(gzip.compress(text.encode()))  # gzip without the suffix
    expected = read("amazon", plain).interactions
    pd.testing.assert_frame_equal(read("amazon", tmp_path / "a.json.gz").interactions, expected)
    pd.testing.assert_frame_equal(read("amazon", tmp_path / "renamed.json").interactions, expected)


def test_amazon_multiple_inputs_are_concatenated(tmp_path):
    a = write(tmp_path / "a.json", jsonl([review("u1", "i1")]))
    b = write(tmp_path / "b.json", jsonl([review("u2", "i2"), review("u3", "i3")]))
    ds = read("amazon", a, b)
    assert list(ds.interactions.user) == ["u1", "u2", "u3"]


def test_amazon_meta_2018_json_and_2014_python_literals(tmp_path):
    reviews = write(tmp_path / "r.json", jsonl([review("u1", "i1"), review("u1", "i2"), review("u2", "i3")]))
    meta_2018 = write(tmp_path / "meta_2018.json", jsonl([
        {"asin": "i1", "title": "Soap", "description": ["Gentle", "  foaming  "]},
        {"asin": "other", "title": "Not reviewed"},
    ]))
    meta_2014 = write(tmp_path / "meta_2014.json.gz", "")
    meta_2014.write_bytes(gzip.compress(
        b"{'asin': 'i2', 'title': \"Kid's Shampoo\", 'description': 'Mild.'}\n"
        b"{'asin': 'i3', 'description': 'No title here'}\n"
    ))
    ds = read("amazon", reviews, meta=[str(meta_2018), str(meta_2014)])
    assert ds.item_texts == {"i1": "Soap. Gentle foaming", "i2": "Kid's Shampoo. Mild.", "i3": "No title here"}


def test_amazon_bad_lines_are_skipped_and_counted(tmp_path):
    path = write(tmp_path / "r.json", jsonl(
        [review(f"u{i}", "i1") for i in range(10)]
        + ['{"reviewerID": "broken"',                                  # line 11
           {"reviewerID": "u1", "overall": 5.0},                       # line 12: no asin
           review("u1", "i2", rating="five"),                          # line 13
           review("u1", "i3", summary=" ", text="\t"),                 # line 14: empty text, kept
           review(" ", "i4")]                                          # line 15
    ))
    ds = read("amazon", path)
    rep = ds.report
    assert rep.skipped == {"bad_json": 1, "missing_field:asin": 1, "non_numeric_rating": 1, "empty_id": 1}
    assert rep.empty_text == 1 and rep.lines_read == 15
    assert len(ds.interactions) == 11 and ds.interactions.review.iloc[-1] == ""
    assert rep.examples[0].startswith(f"{path}:11: bad_json")
    assert any(e.startswith(f"{path}:13: non_numeric_rating") for e in rep.examples)


def test_strict_mode_raises_with_file_and_line(tmp_path):
    path = write(tmp_path / "strict.json", jsonl([review(), "not json"]))
    with pytest.raises(InputError, match=r"strict\.json:2: bad_json"):
        read("amazon", path, strict=True)


def test_too_many_bad_lines_reject_the_file(tmp_path):
    path = write(tmp_path / "wrong.json", "user,item\n" * 5 + jsonl([review()]))
    with pytest.raises(InputError, match=r"wrong\.json: 5 of 6 lines are bad.*--format"):
        read("amazon", path, max_bad_fraction=0.1)


def test_unknown_format_lists_known_formats(tmp_path):
    with pytest.raises(InputError) as err:
        read("netflix", tmp_path / "x")
    assert "netflix" in str(err.value)
    for name in READERS:
        assert name in str(err.value)


# --- yelp -------------------------------------------------------------------------------------------


def test_yelp_fields_and_dates(tmp_path):
    path = write(tmp_path / "yelp_review.json", jsonl([
        {"user_id": "U1", "business_id": "B1", "stars": 4, "text": "Tasty  tacos\n", "date": "2016-03-09 00:00:00"},
        {"user_id": "U2", "business_id": "B1", "stars": 1.0, "text": ""},
        {"user_id": "U3", "business_id": "B2", "text": "no stars", "date": "2016-03-09"},
        {"user_id": "U3", "business_id": "B2", "stars": 2, "text": "ok", "date": "2016-03-10"},
    ]))
    ds = read("yelp", path)
    df = ds.interactions
    assert list(df.user) == ["U1", "U2", "U3"] and list(df.item) == ["B1", "B1", "B2"]
    assert list(df.rating) == [4.0, 1.0, 2.0]
    assert df.timestamp[0] == 1457481600.0 and math.isnan(df.timestamp[1]) and df.timestamp[2] == 1457568000.0
    assert list(df.review) == ["Tasty tacos", "", "ok"]
    assert ds.report.skipped == {"missing_field:stars": 1} and ds.report.empty_text == 1


# --- s3rec (also the fsspec memory:// path) ---------------------------------------------------------


def test_s3rec_sequences_from_memory_url(tmp_path):
    url = f"memory://{tmp_path.name}/Beauty.txt"
    with fsspec.open(url, "wb") as f:
        f.write(b"1 10 11 12\n2 11\n\n3\n4 12 10\n")
    ds = read("s3rec", url)
    df = ds.interactions
    assert list(df.user) == ["1", "1", "1", "2", "4", "4"]
    assert list(df.item) == ["10", "11", "12", "11", "12", "10"]
    assert list(df.timestamp) == [0.0, 1.0, 2.0, 0.0, 0.0, 1.0]
    assert df.rating.isna().all() and (df.review == "").all()
    assert not ds.has_ratings and ds.name == "Beauty"
    assert ds.report.skipped == {"wrong_field_count": 1}
    assert ds.report.examples == [f"{url}:4: wrong_field_count (user '3' has no items)"]


# --- movielens --------------------------------------------------------------------------------------

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1" + "|0" * 13 + "\n"
    "2|Caf\xe9 (1996)|01-Jan-1996||http://y|1" + "|0" * 18 + "\n"
)


def ml100k(folder: Path, genre_file: bool = True) -> Path:
    write(folder / "u.data", "0\t1\t5\t10\n0\t2\t1\t10\t\n196\t1\t3\t881250949\n186\t2\t4\t891717742\n")
    write(folder / "u.item", U_ITEM, encoding="latin-1")
    write(folder / "u.user", "196|24|M|technician|85711\n186|18|F|other|94043\n")
    if genre_file:
        names = (["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy"]
                 + [f"G{i}" for i in range(6, 19)])
        write(folder / "u.genre", "".join(f"{n}|{i}\n" for i, n in enumerate(names)) + "\n")
    return folder


def test_movielens_100k_folder(tmp_path):
    ds = read("movielens", ml100k(tmp_path / "ml-100k"))
    df = ds.interactions
    assert list(df.user) == ["0", "196", "186"] and list(df.item) == ["1", "1", "2"]
    assert list(df.rating) == [5.0, 3.0, 4.0] and list(df.timestamp) == [10.0, 881250949.0, 891717742.0]
    assert ds.report.skipped == {"wrong_field_count": 1}
    assert ds.report.examples[0].startswith(f"{tmp_path / 'ml-100k' / 'u.data'}:2: wrong_field_count")
    assert ds.item_texts == {"1": "Toy Story (1995). Genres: Animation, Children's, Comedy", "2": "Caf\xe9 (1996)"}
    assert ds.user_texts == {"196": "A 24-year-old male technician.",
                             "186": "An 18-year-old female with another occupation."}


def test_movielens_100k_without_genre_file_uses_standard_names(tmp_path):
    ds = read("movielens", ml100k(tmp_path / "ml", genre_file=False) / "u.data")  # a u.data path reads its folder
    assert ds.item_texts["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"


LATEST = {
    "ratings.csv": "userId,movieId,rating,timestamp\n1,11,4.5,964982703\n1,12,x,964982704\n2,11,3.0,964982705\n",
    "movies.csv": 'movieId,title,genres\n11,"American President, The (1995)",Comedy|Drama\n'
                  '12,Odd (2017),(no genres listed)\n',
    "tags.csv": "userId,movieId,tag,timestamp\n1,11,funny,1\n1,12,Funny,2\n1,12,  dark  ,3\n2,11,,4\n",
}


def check_latest(ds, where: str):
    df = ds.interactions
    assert list(df.user) == ["1", "2"] and list(df.item) == ["11", "11"] and list(df.rating) == [4.5, 3.0]
    assert ds.report.skipped == {"non_numeric_rating": 1}
    assert ds.report.examples[0].startswith(f"{where}:3: non_numeric_rating")
    assert ds.item_texts == {"11": "American President, The (1995). Genres: Comedy, Drama", "12": "Odd (2017)"}
    # tags are user-item documents (the review of the pair): user 1 tagged the rated movie 11; 12's rating
    # line is bad, so its tags have no interaction; user 2's empty tag gives no text
    assert list(df.review) == ["Tags: funny", ""]
    assert ds.user_texts == {}


def test_movielens_latest_zip_and_folder(tmp_path):
    zpath = tmp_path / "ml-latest-small.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for name, text in LATEST.items():
            z.writestr(f"ml-latest-small/{name}", text)
    check_latest(read("movielens", zpath), f"{zpath}/ml-latest-small/ratings.csv")
    folder = tmp_path / "extracted"
    for name, text in LATEST.items():
        write(folder / name, text)
    check_latest(read("movielens", folder), f"{folder}/ratings.csv")


def test_movielens_neither_layout_says_what_is_expected(tmp_path):
    write(tmp_path / "stuff" / "notes.txt", "hello\n")
    with pytest.raises(InputError, match=r"expected MovieLens 100K \(u\.data.*ratings\.csv.*found: notes\.txt"):
        read("movielens", tmp_path / "stuff")
    with pytest.raises(InputError, match=r"not a folder or \.zip"):
        read("movielens", tmp_path / "stuff" / "notes.txt")


# --- table ------------------------------------------------------------------------------------------


def test_table_csv_all_columns_and_bad_rows(tmp_path):
    path = write(tmp_path / "log.csv", (
        "user,item,rating,timestamp,review,user_text,item_text\n"
        "a,x,5,100,nice,,Item X\n"
        'a,y,4,2020-01-02T03:04:05Z,"long, quoted",Reader A,Item Y\n'
        "b,x,bad,300,r,Reader B,Item X2\n"          # line 4: non-numeric rating
        "b,y,3,400,r,Reader B,Item Y,extra\n"       # line 5: trailing field
        "b,x,2,,  ,Reader B2,\n"
    ))
    ds = read("table", path)
    df = ds.interactions
    assert list(df.user) == ["a", "a", "b"] and list(df.item) == ["x", "y", "x"]
    assert list(df.rating) == [5.0, 4.0, 2.0]
    assert df.timestamp[0] == 100.0 and df.timestamp[1] == 1577934245.0 and math.isnan(df.timestamp[2])
    assert list(df.review) == ["nice", "long, quoted", ""]
    assert ds.user_texts == {"a": "Reader A", "b": "Reader B2"}
    assert ds.item_texts == {"x": "Item X", "y": "Item Y"}
    assert ds.report.skipped == {"non_numeric_rating": 1, "wrong_field_count": 1}
    assert ds.report.examples[0] == f"{path}:4: non_numeric_rating (rating='bad')"
    assert ds.report.examples[1].startswith(f"{path}:5: wrong_field_count")


def test_table_tsv_custom_columns_without_rating(tmp_path):
    path = write(tmp_path / "log.tsv", "uid\tiid\twhen\n1\t7\t2016-03-09\n2\t8\tnot a date\n")
    ds = read("table", path, user_col="uid", item_col="iid", timestamp_col="when")
    assert list(ds.interactions.user) == ["1"] and ds.interactions.timestamp[0] == 1457481600.0
    assert not ds.has_ratings and ds.interactions.rating.isna().all()
    assert ds.report.skipped == {"bad_timestamp": 1}


def test_table_missing_required_column_names_file_columns_and_flag(tmp_path):
    path = write(tmp_path / "log.csv", "userId,item\n1,2\n")
    with pytest.raises(InputError) as err:
        read("table", path)
    message = str(err.value)
    for part in (str(path), "'user'", "'userId'", "'item'", "--user-col"):
        assert part in message


def test_table_parquet_file(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user": [1, 2], "item": ["x", "y"], "rating": [5.0, None],
                  "timestamp": pd.to_datetime(["2016-03-09", "2016-03-10"])}).to_parquet(path)
    ds = read("table", path)
    assert list(ds.interactions.user) == ["1"] and list(ds.interactions.timestamp) == [1457481600.0]
    assert ds.report.skipped == {"non_numeric_rating": 1} and ds.report.examples[0].startswith(f"{path}:2:")


def test_table_folder_layout(tmp_path):
    folder = tmp_path / "raw"
    write(folder / "interactions.csv", "user,item,rating,timestamp,review\nu1,i1,5,1,good\nu2,i1,1,2,bad\n")
    write(folder / "users.csv", "user,user_text\nu1,\nu1,Likes tea.\nu2,Hates tea.\n")
    write(folder / "items.csv", "item,item_text\ni1,Green tea.\n")
    ds = read("table", folder)
    assert list(ds.interactions.review) == ["good", "bad"] and ds.name == "raw"
    assert ds.user_texts == {"u1": "Likes tea.", "u2": "Hates tea."}
    assert ds.item_texts == {"i1": "Green tea."}
    write(tmp_path / "empty" / "users.csv", "user,user_text\n")
    with pytest.raises(InputError, match="interactions.csv"):
        read("table", tmp_path / "empty")


# --- the real data (shared/data beside the checkout; skipped where it is absent) ---------------------


def test_real_datasets(shared_data):
    cases = [
        ("movielens", shared_data / "movielens-100k", 100_002, {"wrong_field_count": 1}),
        ("movielens", shared_data / "movielens-latest-small" / "ml-latest-small.zip", 100_836, {}),
        ("amazon", shared_data / "amazon-all-beauty-5core-2018" / "All_Beauty_5.json.gz", 5_269, {}),
        ("s3rec", shared_data / "amazon-5core-seq-s3rec" / "Beauty.txt", 198_502, {}),
    ]
    for fmt, path, rows, skipped in cases:
        ds = read(fmt, path, max_bad_fraction=0.1)
        assert len(ds.interactions) == rows, path
        assert dict(ds.report.skipped) == skipped, path
    ml100k_ = read("movielens", shared_data / "movielens-100k")
    assert ml100k_.report._lines_in_file[str(shared_data / "movielens-100k" / "u.data")] == 100_003
    assert ml100k_.interactions.user.nunique() == 944  # 943 + the fake user 0, removed later by k-core
    assert len(ml100k_.user_texts) == 943 and len(ml100k_.item_texts) == 1682
    beauty = read("s3rec", shared_data / "amazon-5core-seq-s3rec" / "Beauty.txt")
    assert beauty.interactions.user.nunique() == 22_363 and beauty.interactions.item.nunique() == 12_101
