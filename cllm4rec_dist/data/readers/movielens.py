"""MovieLens, recognised by content: the 100K release or a "latest" release, as a folder or a .zip.

``--input`` is a folder, a .zip (files may sit in a subfolder, as in the
official zips), or a ``u.data``/``ratings.csv`` file (its folder is read).

MovieLens 100K (``u.data`` present):

* ``u.data``: tab-separated ``user item rating timestamp``. A line with another
  number of fields is a bad line (``wrong_field_count``). Some copies carry
  extra rows for a fake user 0; they are read like any other row (the k-core
  filter removes that user), one of them has a trailing tab and is skipped.
* ``u.item`` (latin-1, ``|``-separated; the last 19 fields are genre flags):
  item text "Title (year). Genres: Action, Comedy"; item title "Title (year)". Genre names come from
  ``u.genre`` when present, else the standard list; the "unknown" genre is not
  written (a movie with no other genre gets just its title).
* ``u.user`` (``id|age|gender|occupation|zip``): user text such as
  "A 24-year-old male technician." The zip code is left out: it says little
  to a language model and is the most identifying field.

MovieLens latest / 20M / 25M / 32M (``ratings.csv`` present):

* ``ratings.csv``: ``userId,movieId,rating,timestamp``.
* ``movies.csv``: ``movieId,title,genres`` (``|``-separated) -> item text
  "Title (year). Genres: A, B" ("(no genres listed)" -> just the title); item title = ``title``.
* ``tags.csv``: ``userId,movieId,tag,timestamp`` -> a user-item document, the
  review text "Tags: t1, t2, ..." of that (user, movie) rating: the pair's
  distinct tags (case-insensitive, first spelling kept) in file order, at most
  ``MAX_TAGS``. Tags are the only free text a MovieLens user writes. Like any
  review, the protocol keeps it only for TRAIN pairs, so a held-out movie's tags
  never reach training (a per-user summary of all tags would leak them); tags of
  a movie the user did not rate have no interaction to attach to and are dropped.
"""

from __future__ import annotations

import zipfile
from contextlib import contextmanager

import fsspec

from cllm4rec_dist.data.readers.table import column_index, open_table
from cllm4rec_dist.data.records import (
    InputError,
    InputReport,
    RawDataset,
    base_name,
    clean_text,
    exists,
    is_dir,
    join_path,
    open_binary,
    text_lines,
    to_number,
)

MAX_TAGS = 50
STANDARD_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
EXPECTED = (
    "expected MovieLens 100K (u.data, optional u.item, u.user, u.genre) or MovieLens latest "
    "(ratings.csv, optional movies.csv, tags.csv), as a folder or a .zip"
)
# u.user occupations that are not a noun for a person.
OCCUPATION_PHRASES = {
    "none": "with no occupation",
    "other": "with another occupation",
    "entertainment": "working in entertainment",
    "marketing": "working in marketing",
    "healthcare": "working in healthcare",
}


def read(options, report: InputReport) -> RawDataset:
    if len(options.inputs) != 1:
        raise InputError(f"--format movielens reads one --input (a folder or .zip), "
                         f"got {len(options.inputs)}: {options.inputs}")
    path = options.inputs[0]
    with MovieLensSource(path) as source:
        if source.has("u.data"):
            rows, user_texts, item_texts, item_titles = _read_100k(source, report)
        elif source.has("ratings.csv"):
            rows, user_texts, item_texts, item_titles = _read_latest(source, report)
        else:
            raise InputError(f"{path}: {EXPECTED}; found: {source.listing()}")
    return RawDataset(
        name=base_name(path),
        interactions=RawDataset.frame(rows),
        user_texts=user_texts,
        item_texts=item_texts,
        item_titles=item_titles,
        has_ratings=True,
        report=report,
    )


class MovieLensSource:
    """A MovieLens folder or zip file whose files are looked up by base name."""

    def __init__(self, path: str):
        self.path, self._zip, self._members = path, None, {}
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if is_dir(path):
            self.folder = path
        elif name in ("u.data", "ratings.csv"):
            self.folder = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
        elif not exists(path):
            raise InputError(f"{path}: no such file or folder; {EXPECTED}.")
        elif name.lower().endswith(".zip") or _magic(path) == b"PK\x03\x04":
            self.folder = None
        else:
            raise InputError(f"{path}: not a folder or .zip; {EXPECTED}.")

    def __enter__(self):
        if self.folder is None:
            self._file = fsspec.open(self.path, "rb").open()
            try:
                self._zip = zipfile.ZipFile(self._file)
            except zipfile.BadZipFile as err:
                self._file.close()
                raise InputError(f"{self.path}: not a valid zip file ({err}); {EXPECTED}.") from err
            for member in self._zip.namelist():
                if not member.endswith("/") and not member.startswith("__MACOSX/"):
                    self._members.setdefault(member.rsplit("/", 1)[-1], member)
        return self

    def __exit__(self, *exc):
        if self._zip is not None:
            self._zip.close()
            self._file.close()

    def has(self, name: str) -> bool:
        return name in self._members if self._zip is not None else exists(join_path(self.folder, name))

    def label(self, name: str) -> str:
        """The file's name in messages: a path, or ``<zip>/<member>`` inside a zip."""
        return join_path(self.path, self._members[name]) if self._zip is not None else join_path(self.folder, name)

    def opener(self, name: str):
        if self._zip is not None:
            return lambda: self._zip.open(self._members[name])
        return lambda: open_binary(join_path(self.folder, name))

    def listing(self) -> str:
        if self._zip is not None:
            names = sorted(self._members)
        else:
            fs, root = fsspec.core.url_to_fs(self.folder)
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"


def _magic(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read(4)


@contextmanager
def _lines(source: MovieLensSource, name: str, report: InputReport):
    """(label, (lineno, fields) pairs) of a ``|``/tab-separated 100K file (latin-1); finishes the file after.

    Each non-blank line is counted with ``report.line``; only the line end is
    stripped, so a trailing separator shows up as an extra (empty) field.
    """
    label, sep = source.label(name), "\t" if name == "u.data" else "|"

    def lines(raw):
        for lineno, line in text_lines(raw, label, report, "latin-1"):
            if line.strip():
                report.line(label)
                yield lineno, line.rstrip("\r\n").split(sep)

    with source.opener(name)() as raw:
        yield label, lines(raw)
    report.finish_file(label)


def _read_100k(source: MovieLensSource, report: InputReport):
    rows = []
    with _lines(source, "u.data", report) as (label, lines):
        for lineno, fields in lines:
            row = _rating_row(fields, 4, label, lineno, report)
            if row is not None:
                rows.append(row)
    genres = _genres(source)
    item_texts, user_texts, item_titles = {}, {}, {}
    if source.has("u.item"):
        with _lines(source, "u.item", report) as (label, lines):
            for lineno, fields in lines:
                if len(fields) != 5 + len(genres):
                    report.bad(label, lineno, "wrong_field_count", f"{len(fields)} fields, expected {5 + len(genres)}")
                    continue
                names = [g for g, flag in zip(genres, fields[5:]) if flag.strip() == "1" and g != "unknown"]
                item_texts[fields[0].strip()] = report.text(_titled(fields[1], names))
                item_titles[fields[0].strip()] = clean_text(fields[1])
    if source.has("u.user"):
        with _lines(source, "u.user", report) as (label, lines):
            for lineno, fields in lines:
                if len(fields) != 5:
                    report.bad(label, lineno, "wrong_field_count",
                               f"{len(fields)} fields, expected 5 (id|age|gender|occupation|zip)")
                    continue
                user_texts[fields[0].strip()] = report.text(user_bio(fields[1], fields[2], fields[3]))
    return rows, user_texts, item_texts, item_titles


def _rating_row(fields, width: int, label: str, lineno: int, report: InputReport):
    """(user, item, rating, timestamp, '') from ``user item rating timestamp`` fields, or None for a bad line."""
    if len(fields) != width:
        report.bad(label, lineno, "wrong_field_count",
                   f"{len(fields)} fields, expected {width} (user, item, rating, timestamp)")
        return None
    user, item = fields[0].strip(), fields[1].strip()
    if not user or not item:
        report.bad(label, lineno, "empty_id", "user" if not user else "item")
        return None
    rating = to_number(fields[2])
    if rating is None:
        report.bad(label, lineno, "non_numeric_rating", repr(fields[2]))
        return None
    timestamp = to_number(fields[3])
    if timestamp is None:
        report.bad(label, lineno, "non_numeric_timestamp", repr(fields[3]))
        return None
    return (user, item, rating, timestamp, "")


def _genres(source: MovieLensSource) -> list[str]:
    """Genre names in flag order, from u.genre (``name|index``) when present."""
    if not source.has("u.genre"):
        return STANDARD_GENRES
    pairs = []
    with source.opener("u.genre")() as raw:
        for _, line in text_lines(raw, source.label("u.genre"), InputReport(), "latin-1"):
            name, _, index = line.strip().rpartition("|")
            if name and index.isdigit():
                pairs.append((int(index), name))
    return [name for _, name in sorted(pairs)] or STANDARD_GENRES


def _titled(title: str, genres: list[str]) -> str:
    title = clean_text(title)
    return f"{title}. Genres: {', '.join(genres)}" if genres and title else title


def user_bio(age: str, gender: str, occupation: str) -> str:
    """'A 24-year-old male technician.' from u.user fields; missing parts are left out."""
    age, occupation = age.strip(), clean_text(occupation).lower()
    sex = {"M": "male", "F": "female"}.get(gender.strip().upper(), "")
    noun = occupation if occupation not in OCCUPATION_PHRASES else ""
    words = [
        f"{age}-year-old" if age.isdigit() and int(age) > 0 else "",
        sex,
        noun or ("" if sex else "person"),
        OCCUPATION_PHRASES.get(occupation, ""),
    ]
    text = " ".join(w for w in words if w)
    article = "An" if text[0] in "aeiou8" or text.startswith(("11-", "18-")) else "A"
    return f"{article} {text}."


@contextmanager
def _csv(source: MovieLensSource, name: str, columns: tuple[str, ...], report: InputReport):
    """(label, column positions, (lineno, row) pairs) of a MovieLens latest CSV file; finishes the file after."""
    label = source.label(name)
    with open_table(label, report, opener=source.opener(name), delimiter=",") as (header, lines):
        fix = f"Not a MovieLens {name} (expected columns {','.join(columns)})."
        yield label, [column_index(header, c, label, fix) for c in columns], lines
    report.finish_file(label)


def _read_latest(source: MovieLensSource, report: InputReport):
    rows, item_texts, user_texts, item_titles = [], {}, {}, {}
    with _csv(source, "ratings.csv", ("userId", "movieId", "rating", "timestamp"), report) as (label, cols, lines):
        for lineno, row in lines:
            parsed = _rating_row([row[i] for i in cols], 4, label, lineno, report)
            if parsed is not None:
                rows.append(parsed)
    if source.has("movies.csv"):
        with _csv(source, "movies.csv", ("movieId", "title", "genres"), report) as (_, (movie, title, genres), lines):
            for _, row in lines:
                names = [g.strip() for g in row[genres].split("|") if g.strip() not in ("", "(no genres listed)")]
                item_texts[row[movie].strip()] = report.text(_titled(row[title], names))
                item_titles[row[movie].strip()] = clean_text(row[title])
    if source.has("tags.csv"):
        tags: dict[tuple[str, str], dict[str, str]] = {}  # (user, movie) -> {lowercased tag: first spelling}
        with _csv(source, "tags.csv", ("userId", "movieId", "tag"), report) as (_, (user, movie, tag), lines):
            for _, row in lines:
                text = clean_text(row[tag])
                seen = tags.setdefault((row[user].strip(), row[movie].strip()), {})
                if text and len(seen) < MAX_TAGS:
                    seen.setdefault(text.lower(), text)
        rows = [(u, i, r, t, report.text("Tags: " + ", ".join(tags[u, i].values())) if tags.get((u, i)) else review)
                for u, i, r, t, review in rows]
    return rows, user_texts, item_texts, item_titles
