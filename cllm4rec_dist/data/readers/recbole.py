"""RecBole atomic files: ``<name>.inter`` with optional ``<name>.item`` and ``<name>.user``.

``--input`` is the dataset FOLDER (RecBole's ``dataset/<name>/`` holding ``<name>.inter``) or the
``.inter`` file itself; the ``.item`` / ``.user`` files beside it with the same stem are read when
they exist. Files are tab-separated with a typed header line, ``field:type``, e.g.
``user_id:token	item_id:token	rating:float	timestamp:float``. Types: ``token`` (one string),
``token_seq`` (space-separated tokens; read as text), ``float``, ``float_seq``.

What is read (RecBole's default field names, ``USER_ID_FIELD`` etc. of its config):

* ``.inter``: ``user_id`` and ``item_id`` (required, ``:token``); ``rating`` and ``timestamp``
  (``:float``, optional: no rating field -> ``has_ratings=False``; no timestamp -> file order);
  a review from the first of ``review``, ``review_text``, ``text`` that is a text field.
* ``.item``: the title from the first of ``title``, ``movie_title``, ``item_title``, ``item_name``,
  ``name`` (-> ``item_titles``); the item text from ``item_text`` if the file has it, else the
  title and the other ``:token_seq`` fields joined with ". " (ml-100k: title + genres).
* ``.user``: the user text from ``user_text`` if the file has it, else the ``:token_seq`` fields
  joined with ". " (no such field -> no user texts).

Every other field is ignored. A required field that is missing or has the wrong type is an error
naming the file, the field and the header; bad lines follow the rule of ``data/records.py``
(``wrong_field_count``, ``empty_id``, ``non_numeric_rating``, ``non_numeric_timestamp``; counted,
or an error with ``--strict``). Texts, ids and line numbers are as in the file (header = line 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cllm4rec_dist.data.readers.table import _first_non_empty as first_non_empty
from cllm4rec_dist.data.readers.table import ident, open_table
from cllm4rec_dist.data.records import (
    InputError,
    InputReport,
    RawDataset,
    clean_text,
    exists,
    is_dir,
    join_path,
    to_number,
)

TYPES = ("token", "token_seq", "float", "float_seq")
TEXT_TYPES = ("token", "token_seq")
USER_FIELD, ITEM_FIELD, RATING_FIELD, TIME_FIELD = "user_id", "item_id", "rating", "timestamp"
REVIEW_FIELDS = ("review", "review_text", "text")
TITLE_FIELDS = ("title", "movie_title", "item_title", "item_name", "name")
FORMAT_HINT = "RecBole atomic files have a tab-separated header of name:type fields (user_id:token item_id:token ...)."


@dataclass
class Header:
    """A parsed atomic-file header: field names and types in column order."""

    path: str
    names: list[str]
    types: list[str]

    @classmethod
    def parse(cls, path: str, header: list[str]) -> Header:
        names, types = [], []
        for column in header:
            name, sep, type_ = column.rpartition(":")
            if not sep or not name or type_ not in TYPES:
                raise InputError(f"{path}: header field {column!r} is not name:type with type one of "
                                 f"{', '.join(TYPES)}. {FORMAT_HINT}")
            names.append(name)
            types.append(type_)
        return cls(path, names, types)

    def index(self, name: str, allowed: tuple[str, ...], required: bool = False) -> int | None:
        """Column of field ``name`` with a type in ``allowed``; None (or an error if required) when absent."""
        if name not in self.names:
            if required:
                raise InputError(f"{self.path}: no field {name!r}; the header is "
                                 f"{', '.join(f'{n}:{t}' for n, t in zip(self.names, self.types))}. {FORMAT_HINT}")
            return None
        col = self.names.index(name)
        if self.types[col] not in allowed:
            raise InputError(f"{self.path}: field {name!r} has type {self.types[col]!r}; expected "
                             f"{' or '.join(allowed)}. Fix the header (RecBole's {name}:{allowed[0]}).")
        return col

    def first_text(self, candidates: tuple[str, ...]) -> int | None:
        return next((self.names.index(n) for n in candidates
                     if n in self.names and self.types[self.names.index(n)] in TEXT_TYPES), None)

    def seq_columns(self, exclude: set[int]) -> list[int]:
        return [c for c, t in enumerate(self.types) if t == "token_seq" and c not in exclude]


def atomic_files(path: str) -> dict[str, str]:
    """{'inter': path, 'item': path?, 'user': path?} for a dataset folder or a ``.inter`` file."""
    if is_dir(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        inters = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".inter"))
        if len(inters) != 1:
            found = ", ".join(inters) or "none"
            raise InputError(f"{path}: a --format recbole folder needs exactly one <name>.inter file (found: {found}); "
                             "or pass the .inter file itself as --input.")
        stem = join_path(path, inters[0].rstrip("/").rsplit("/", 1)[-1][: -len(".inter")])
    elif path.endswith(".inter"):
        stem = path[: -len(".inter")]
    else:
        raise InputError(f"{path}: --format recbole reads a <name>.inter file or the folder holding it.")
    files = {"inter": f"{stem}.inter"}
    for kind in ("item", "user"):
        if exists(f"{stem}.{kind}"):
            files[kind] = f"{stem}.{kind}"
    return files


def read(options, report: InputReport) -> RawDataset:
    rows: list[tuple] = []
    user_texts: dict[str, str] = {}
    item_texts: dict[str, str] = {}
    item_titles: dict[str, str] = {}
    has_ratings = []
    for path in options.inputs:
        files = atomic_files(path)
        has_ratings.append((files["inter"], _read_inter(files["inter"], report, rows)))
        if "item" in files:
            _read_side(files["item"], ITEM_FIELD, "item_text", report, item_texts, item_titles)
        if "user" in files:
            _read_side(files["user"], USER_FIELD, "user_text", report, user_texts, None)
    if len({had for _, had in has_ratings}) > 1:
        listing = ", ".join(f"{f} ({'has' if had else 'no'} rating field)" for f, had in has_ratings)
        raise InputError(f"some .inter files have a rating field and some do not: {listing}. Read them separately.")
    first = atomic_files(options.inputs[0])["inter"]
    return RawDataset(
        name=first.rstrip("/").rsplit("/", 1)[-1][: -len(".inter")],
        interactions=RawDataset.frame(rows),
        user_texts={k: report.text(v) for k, v in user_texts.items()},
        item_texts={k: report.text(v) for k, v in item_texts.items()},
        item_titles={k: v for k, v in item_titles.items() if v},
        has_ratings=has_ratings[0][1],
        report=report,
    )


def _read_inter(path: str, report: InputReport, rows: list[tuple]) -> bool:
    """Append the interactions of a ``.inter`` file to ``rows``; returns whether it has ratings."""
    with open_table(path, report, delimiter="\t") as (columns, lines):
        header = Header.parse(path, columns)
        user = header.index(USER_FIELD, ("token",), required=True)
        item = header.index(ITEM_FIELD, ("token",), required=True)
        rating = header.index(RATING_FIELD, ("float",))
        stamp = header.index(TIME_FIELD, ("float",))
        review = header.first_text(REVIEW_FIELDS)
        for lineno, row in lines:
            u, i = ident(row[user]), ident(row[item])
            if not u or not i:
                report.bad(path, lineno, "empty_id", USER_FIELD if not u else ITEM_FIELD)
                continue
            value = math.nan
            if rating is not None:
                value = to_number(row[rating])
                if value is None:
                    report.bad(path, lineno, "non_numeric_rating", f"{RATING_FIELD}={row[rating]!r}")
                    continue
            seconds = math.nan
            if stamp is not None and row[stamp].strip():
                seconds = to_number(row[stamp])
                if seconds is None:
                    report.bad(path, lineno, "non_numeric_timestamp", f"{TIME_FIELD}={row[stamp]!r}")
                    continue
            rows.append((u, i, value, seconds, report.text(row[review]) if review is not None else ""))
    report.finish_file(path)
    return rating is not None


def _read_side(path: str, id_field: str, text_field: str, report: InputReport, texts: dict[str, str],
               titles: dict[str, str] | None) -> None:
    """Texts (and, for items, titles) of a ``.item`` / ``.user`` file; the first non-empty value per id wins."""
    with open_table(path, report, delimiter="\t") as (columns, lines):
        header = Header.parse(path, columns)
        key = header.index(id_field, ("token",), required=True)
        title = header.first_text(TITLE_FIELDS) if titles is not None else None
        text = header.index(text_field, TEXT_TYPES)
        parts = [text] if text is not None else (
            ([title] if title is not None else [])
            + header.seq_columns({key} | ({title} if title is not None else set())))
        for lineno, row in lines:
            ident_ = ident(row[key])
            if not ident_:
                report.bad(path, lineno, "empty_id", id_field)
                continue
            if parts:
                first_non_empty(texts, ident_, ". ".join(filter(None, (clean_text(row[c]) for c in parts))))
            if title is not None:
                first_non_empty(titles, ident_, clean_text(row[title]))
    report.finish_file(path)
