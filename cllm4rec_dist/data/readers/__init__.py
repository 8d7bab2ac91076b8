"""One reader per source format. A reader turns raw files into a ``RawDataset``.

Adding a format: write ``readers/<name>.py`` with a function
``read(options: ReaderOptions, report: InputReport) -> RawDataset`` and add it
to ``READERS`` below with a one-line description (shown by ``--help``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from cllm4rec_dist.data.records import InputError, InputReport, RawDataset

# name -> (module under cllm4rec_dist.data.readers, one-line help)
READERS: dict[str, tuple[str, str]] = {
    "amazon": ("amazon",
               "Amazon review JSON-lines (.json/.json.gz, 2014 or 2018 fields); --meta adds item title/description"),
    "yelp": ("yelp", "Yelp review JSON-lines (user_id, business_id, stars, text)"),
    "movielens": ("movielens",
                  "MovieLens 100K folder (u.data/u.item/u.user) or latest zip/folder "
                  "(ratings.csv, movies.csv, tags.csv)"),
    "s3rec": ("s3rec", "S3-Rec sequence file: 'user item item ...' per line, no ratings; --item-titles adds titles"),
    "recbole": ("recbole",
                "RecBole atomic files: <name>.inter [+ .item, .user] with typed headers (user_id:token ...)"),
    "table": ("table", "generic CSV/TSV/Parquet with named columns (--user-col, --item-col, ...)"),
    "split-npz": ("split_npz", "a released split, used as given: {train,val,test}_matrix.npz + meta.json "
                               "[+ item_tags.json] (the CLLM4Rec authors' Beauty/Sports)"),
    "sequences-json": ("sequences_json", "a released leave-one-out split, used as given: sequences.json "
                                         "(train/val/test) [+ titles.json] (LlamaRec/A-LLMRec Video Games)"),
}
ITEM_TITLE_FORMATS = ("s3rec",)
"""The formats that read ``--item-titles`` (the others carry their titles in their own files)."""


@dataclass
class ReaderOptions:
    """What a reader gets from the command line."""

    inputs: list[str]
    """--input: file(s) or folder (local path or fsspec URL)."""
    meta: list[str] = field(default_factory=list)
    """--meta: extra side files (Amazon item metadata JSON-lines)."""
    user_col: str = "user"
    item_col: str = "item"
    rating_col: str | None = "rating"
    timestamp_col: str | None = "timestamp"
    review_col: str | None = "review"
    user_text_col: str | None = "user_text"
    item_text_col: str | None = "item_text"
    item_title_col: str | None = "item_title"
    """Column names for --format table; a missing optional column is simply absent."""
    item_titles: str | None = None
    """--item-titles: a JSON map item id -> title (or {"title": ...}) for --format s3rec."""


def read_dataset(fmt: str, options: ReaderOptions, report: InputReport) -> RawDataset:
    """Dispatch to the reader named ``fmt``; an unknown name lists the known ones."""
    if fmt not in READERS:
        known = ", ".join(sorted(READERS))
        raise InputError(f"unknown --format {fmt!r}; known formats: {known}")
    if options.item_titles and fmt not in ITEM_TITLE_FORMATS:
        raise InputError(f"--item-titles is read by --format {', '.join(ITEM_TITLE_FORMATS)} only, not {fmt}; "
                         "leave it out (this format's titles come from its own files).")
    module = importlib.import_module(f"cllm4rec_dist.data.readers.{READERS[fmt][0]}")
    return module.read(options, report)
