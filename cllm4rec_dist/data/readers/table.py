"""Generic tables: CSV, TSV or Parquet with named columns, one interaction per row.

``--input`` is one or more FILES or a FOLDER.

Files: ``.csv`` is comma-separated, ``.tsv``/``.tab`` tab-separated (other
names: tab if the header line has a tab, else comma); Parquet is recognised by
``.parquet``/``.pq`` or its ``PAR1`` magic. CSV/TSV need a header line. Column
names come from the flags: ``--user-col`` and ``--item-col`` are required;
``--rating-col``, ``--timestamp-col``, ``--review-col``, ``--user-text-col``,
``--item-text-col`` and ``--item-title-col`` are used when the column exists and ignored when it does
not (no rating column -> ``has_ratings=False``). A timestamp is unix seconds or
a date string (parsed with pandas, naive = UTC); an empty one is NaN.

``user_text``/``item_text``/``item_title`` hold a per-user / per-item text repeated on each of
its rows (the title is the item's short name, the text its description); when rows disagree the FIRST NON-EMPTY
value in file order wins.

Folder layout (what ``cllm4rec demo-data`` writes)::

    <folder>/interactions.csv   (or interactions.parquet / interactions.tsv)
             columns user,item[,rating][,timestamp][,review] (names as the flags)
    <folder>/users.csv          optional; columns user,user_text
    <folder>/items.csv          optional; columns item,item_text[,item_title]

users.csv/items.csv (or .parquet) always use those fixed column names (``item_title`` optional); their
texts fill in after any text columns of the interactions file (first non-empty
wins again). They hold one row per id: a second row for an id that gives it ANOTHER non-empty text or title is
a bad line (``conflicting_duplicate``: skipped and counted, the first row kept; with --strict an error naming
file and line), a repeated row that agrees is taken.

Line numbers in messages are file line numbers (the header is line 1); for
Parquet they are 1-based row numbers.
"""

from __future__ import annotations

import collections
import csv
import datetime as dt
import math
from contextlib import contextmanager

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cllm4rec_dist.data.records import (
    InputError,
    InputReport,
    RawDataset,
    base_name,
    clean_text,
    dates_to_seconds,
    decoded_lines,
    exists,
    is_dir,
    join_path,
    open_binary,
    to_number,
)

MAX_FIELD_CHARS = 1 << 20
"""Longest CSV field accepted (1 Mi characters; the csv module's default of 128 Ki is too small for some reviews).
The bound is what turns an unterminated quote into a bad line instead of a field swallowing the rest of the file."""
csv.field_size_limit(MAX_FIELD_CHARS)

FOLDER_INTERACTIONS = ("interactions.csv", "interactions.parquet", "interactions.tsv")
FLAGS = {
    "user_col": "--user-col",
    "item_col": "--item-col",
    "rating_col": "--rating-col",
    "timestamp_col": "--timestamp-col",
    "review_col": "--review-col",
    "user_text_col": "--user-text-col",
    "item_text_col": "--item-text-col",
    "item_title_col": "--item-title-col",
}


def read(options, report: InputReport) -> RawDataset:
    rows: list[tuple] = []
    user_texts: dict[str, str] = {}
    item_texts: dict[str, str] = {}
    item_titles: dict[str, str] = {}
    rating_files = []
    for path in options.inputs:
        if is_dir(path):
            files, side = _folder_files(path), [("users", "user", "user_text"), ("items", "item", "item_text")]
        else:
            files, side = [path], []
        for file in files:
            had_rating = _read_interactions(file, options, report, rows, user_texts, item_texts, item_titles)
            rating_files.append((file, had_rating))
        for stem, key, value in side:
            side_file = _find(path, [f"{stem}.csv", f"{stem}.parquet"])
            if side_file:
                texts = user_texts if key == "user" else item_texts
                titles = item_titles if key == "item" else None
                _read_side_texts(side_file, key, value, report, texts, titles)
    if len({had for _, had in rating_files}) > 1:
        listing = ", ".join(f"{f} ({'has' if had else 'no'} {options.rating_col!r})" for f, had in rating_files)
        raise InputError(f"some input files have a rating column and some do not: {listing}. Read them separately.")
    return RawDataset(
        name=base_name(options.inputs[0]),
        interactions=RawDataset.frame(rows),
        user_texts={k: report.text(v) for k, v in user_texts.items()},
        item_texts={k: report.text(v) for k, v in item_texts.items()},
        item_titles={k: v for k, v in item_titles.items() if v},
        has_ratings=rating_files[0][1],
        report=report,
    )


def _find(folder: str, names) -> str | None:
    return next((join_path(folder, n) for n in names if exists(join_path(folder, n))), None)


def _folder_files(folder: str) -> list[str]:
    found = _find(folder, FOLDER_INTERACTIONS)
    if found is None:
        raise InputError(
            f"{folder}: a --format table folder needs one of {', '.join(FOLDER_INTERACTIONS)} "
            "(plus optional users.csv with columns user,user_text and items.csv with columns item,item_text)."
        )
    return [found]


def column_index(header: list[str], name: str, path: str, fix: str) -> int:
    """Position of column ``name``; a missing one names the columns that exist and ``fix`` (how to fix it)."""
    if name not in header:
        raise InputError(f"{path}: no column {name!r}; the columns are: {', '.join(map(repr, header))}. {fix}")
    return header.index(name)


def set_flag(key: str) -> str:
    return f"Set {FLAGS[key]} to the column that holds it."


def _read_interactions(path, options, report, rows, user_texts, item_texts, item_titles) -> bool:
    """Append the file's rows to ``rows``; returns whether it has a rating column."""
    with open_table(path, report) as (header, lines):
        idx = {key: column_index(header, getattr(options, key), path, set_flag(key))
               for key in ("user_col", "item_col")}
        for key in ("rating_col", "timestamp_col", "review_col", "user_text_col", "item_text_col", "item_title_col"):
            name = getattr(options, key)
            if name and name in header:
                idx[key] = header.index(name)
        parsed = []  # (lineno, user, item, rating, timestamp or raw date, review, user_text, item_text, item_title)
        for lineno, row in lines:
            user, item = ident(row[idx["user_col"]]), ident(row[idx["item_col"]])
            if not user or not item:
                report.bad(path, lineno, "empty_id", options.user_col if not user else options.item_col)
                continue
            rating = math.nan
            if "rating_col" in idx:
                rating = to_number(row[idx["rating_col"]])
                if rating is None:
                    report.bad(path, lineno, "non_numeric_rating", f"{options.rating_col}={row[idx['rating_col']]!r}")
                    continue
            timestamp = _timestamp(row[idx["timestamp_col"]]) if "timestamp_col" in idx else math.nan
            review = report.text(row[idx["review_col"]]) if "review_col" in idx else ""
            utext = clean_text(row[idx["user_text_col"]]) if "user_text_col" in idx else ""
            itext = clean_text(row[idx["item_text_col"]]) if "item_text_col" in idx else ""
            ititle = clean_text(row[idx["item_title_col"]]) if "item_title_col" in idx else ""
            parsed.append((lineno, user, item, rating, timestamp, review, utext, itext, ititle))
        parsed = _parse_dates(parsed, path, report)
    report.finish_file(path)
    for _, user, item, rating, timestamp, review, utext, itext, ititle in parsed:
        rows.append((user, item, rating, timestamp, review))
        if "user_text_col" in idx:
            _first_non_empty(user_texts, user, utext)
        if "item_text_col" in idx:
            _first_non_empty(item_texts, item, itext)
        if "item_title_col" in idx:
            _first_non_empty(item_titles, item, ititle)
    return "rating_col" in idx


def _read_side_texts(path: str, key: str, value: str, report: InputReport, texts: dict[str, str],
                     titles: dict[str, str] | None = None) -> None:
    """Texts (and, for items, titles from an optional ``item_title`` column) of a users/items side file.

    One row per id: a later row for the same id that gives another non-empty text or title than the earlier
    row(s) is a bad line (``conflicting_duplicate``, the earlier value is kept; an error with --strict). A repeated
    row that agrees, or only fills in a value the earlier row left empty, is taken."""
    with open_table(path, report) as (header, lines):
        fix = f"This side file needs the columns {key},{value} (see the folder layout of --format table)."
        k, v = column_index(header, key, path, fix), column_index(header, value, path, fix)
        t = header.index("item_title") if titles is not None and "item_title" in header else None
        seen: dict[str, tuple[int, str, str]] = {}  # id -> (its first line, text, title) of this file
        for lineno, row in lines:
            ident_ = ident(row[k])
            if not ident_:
                report.bad(path, lineno, "empty_id", key)
                continue
            text, title = clean_text(row[v]), clean_text(row[t]) if t is not None else ""
            first = seen.get(ident_)
            if first is not None:
                clash = next((column for column, old, new in ((value, first[1], text), ("item_title", first[2], title))
                              if old and new and old != new), None)
                if clash is not None:
                    report.bad(path, lineno, "conflicting_duplicate",
                               f"{key} {ident_!r} has another {clash} on line {first[0]}; keep one row per {key}")
                    continue
                text, title = first[1] or text, first[2] or title
            seen[ident_] = (first[0] if first else lineno, text, title)
            _first_non_empty(texts, ident_, text)
            if t is not None:
                _first_non_empty(titles, ident_, title)
    report.finish_file(path)


def _first_non_empty(texts: dict[str, str], key: str, text: str) -> None:
    if not texts.get(key):
        texts[key] = text


def ident(value) -> str:
    """An id as a string exactly as in the file, stripped; '' when missing (Parquet ints that became floats lose
    the .0)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _timestamp(value):
    """Float seconds, NaN when empty, or the stripped string when it must be parsed as a date."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, dt.datetime):
        stamp = pd.Timestamp(value)
        return (stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp).timestamp()
    number = to_number(value)
    if number is not None:
        return number
    text = str(value).strip()
    return text if text else math.nan


def _parse_dates(parsed: list[tuple], path: str, report: InputReport) -> list[tuple]:
    """Turn date-string timestamps into seconds in one pandas call; an unparseable date is a bad line."""
    pending = [i for i, row in enumerate(parsed) if isinstance(row[4], str)]
    if not pending:
        return parsed
    seconds = dates_to_seconds([parsed[i][4] for i in pending])
    drop = set()
    for i, sec in zip(pending, seconds):
        if math.isnan(sec):
            report.bad(path, parsed[i][0], "bad_timestamp", repr(parsed[i][4]))
            drop.add(i)
        else:
            parsed[i] = parsed[i][:4] + (sec,) + parsed[i][5:]
    return [row for i, row in enumerate(parsed) if i not in drop]


@contextmanager
def open_table(path: str, report: InputReport, encoding: str = "utf-8", delimiter: str | None = None, opener=None):
    """``with open_table(path, report) as (header, lines)``: the header and (lineno, row) pairs of a
    CSV/TSV/Parquet file.

    ``report.line`` is called for each data row. A CSV row whose field count
    differs from the header's is reported (``wrong_field_count``) and skipped;
    a row the csv module cannot parse is ``bad_csv``. ``opener`` (a function
    returning a binary file context) replaces opening ``path``, which is then
    only the name used in messages (e.g. a member of a zip file).
    """
    with (opener() if opener else open_binary(path)) as raw:
        head = raw.read(4)
        raw.seek(0)
        if head == b"PAR1" or path.lower().endswith((".parquet", ".pq")):
            yield _parquet(raw, path, report)
        else:
            yield _csv(raw, path, report, encoding, delimiter)


def _parquet(raw, path: str, report: InputReport):
    try:
        table = pq.read_table(raw)
    except (pa.ArrowException, OSError, EOFError) as err:
        if type(err) in (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        raise InputError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err}); it is truncated or "
                         "damaged. Write or copy it again.") from None
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]

    def lines():
        for lineno, row in enumerate(zip(*columns), 1):
            report.line(path)
            if any(isinstance(v, bytes) for v in row):  # binary columns: text only if it is valid UTF-8
                try:
                    row = tuple(v.decode("utf-8") if isinstance(v, bytes) else v for v in row)
                except UnicodeDecodeError as err:
                    report.bad(path, lineno, "invalid_encoding", f"not utf-8 at byte {err.start}")
                    continue
            yield lineno, row

    return list(table.column_names), lines()


def _csv(raw, path: str, report: InputReport, encoding: str, delimiter: str | None):
    """Header and (line, row) pairs of a CSV/TSV file, parsed strictly, one record at a time.

    A record normally is one line; a quoted field may hold line breaks. A record that fails to parse
    (an unterminated quote runs into a stray quote, the field-size bound or the end of the file), or that
    spans several lines and has the wrong number of fields, is a ``bad_csv`` line at the line where it
    starts, and parsing resumes at the NEXT line: the rows an unterminated quote ran over are all read.
    """
    lines = decoded_lines(raw, encoding)
    first = next(lines, None)
    while first is not None and first[1] is None:
        report.line(path)
        report.bad(path, first[0], "invalid_encoding", first[2])
        first = next(lines, None)
    if first is None or not first[1].strip():
        raise InputError(f"{path}: the first line is empty; a CSV/TSV table needs a header line with the column names.")
    sep = delimiter or _delimiter(path, first[1])
    pending = collections.deque([first])  # lines to (re-)read before the rest of the file
    used: list[tuple] = []                 # the lines of the record being parsed
    undecodable: list[tuple] = []          # lines met while parsing it that are not valid `encoding`

    def feed():
        while True:
            item = pending.popleft() if pending else next(lines, None)
            if item is None:
                return
            if item[1] is None:  # reported once the record it fell into is settled (so line order holds)
                undecodable.append(item)
                continue
            used.append(item)
            yield item[1]

    def report_undecodable():
        while undecodable:
            lineno, _, problem = undecodable.pop(0)
            report.line(path)
            report.bad(path, lineno, "invalid_encoding", problem)

    def new_reader():
        return csv.reader(feed(), delimiter=sep, strict=True)

    reader = new_reader()
    header = [name.strip() for name in next(reader)]
    header[0] = header[0].lstrip("\ufeff")

    def rows():
        nonlocal reader
        while True:
            used.clear()
            try:
                row = next(reader)
            except StopIteration:
                report_undecodable()
                return
            except csv.Error as err:
                start = used[0][0] if used else 0
                report.line(path)
                report.bad(path, start, "bad_csv", f"{err}; an unterminated quote?")
                pending.extendleft(reversed(used[1:]))  # re-read what this record ran over
                reader = new_reader()
                report_undecodable()
                continue
            start = used[0][0]
            if not row or (len(row) == 1 and not row[0].strip()):
                report_undecodable()
                continue
            if len(row) != len(header) and len(used) > 1:
                # A quote spanning lines glued rows together: re-read them one by one.
                report.line(path)
                report.bad(path, start, "bad_csv", f"a quoted field runs over {len(used)} lines into "
                           f"{len(row)} fields; an unterminated quote?")
                pending.extendleft(reversed(used[1:]))
                reader = new_reader()
                report_undecodable()
                continue
            if undecodable and len(used) > 1:  # an undecodable line inside this record's quoted field
                report.line(path)
                report.bad(path, start, "invalid_encoding", f"line {undecodable[0][0]} of this record: "
                           f"{undecodable[0][2]}")
                undecodable.clear()
                continue
            report_undecodable()
            report.line(path)
            if len(row) != len(header):
                report.bad(path, start, "wrong_field_count", f"{len(row)} fields, the header has {len(header)}")
                continue
            yield start, row

    return header, rows()


def _delimiter(path: str, header_line: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith((".tsv", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    return "\t" if "\t" in header_line else ","
