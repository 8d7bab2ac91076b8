"""What every reader returns: interactions plus optional texts, and a report of what was skipped.

The bad-input rule (one rule for every reader, documented in docs/DATA.md):

* A line that cannot be parsed (bad JSON, wrong number of fields, a missing
  required field, a non-numeric rating, an empty user/item id) is SKIPPED and
  counted under its reason in ``InputReport.skipped``; the first few are kept
  as ``file:line: problem`` examples and printed. ``strict=True`` turns the
  first one into an ``InputError`` instead.
* If more than ``max_bad_fraction`` of a file's lines are bad, the file is
  rejected (``InputError``): that is almost always the wrong ``--format`` or a
  wrong column name, not a few dirty rows.
* Empty or whitespace-only text keeps the interaction and drops the text,
  counted under ``empty_text``.
* Duplicate (user, item) pairs are merged by the protocol (the latest by
  timestamp, else the last in file order, wins) and counted there.
* A side table (a user's or item's text and title, e.g. ``items.csv``) holds one
  row per id: a later row that gives an id ANOTHER non-empty value is a bad line
  (``conflicting_duplicate``; the first row is kept), like an unparseable one.
* A JSON map (``--item-titles``, ``titles.json``, ``item_tags.json``, a user of
  ``sequences.json``) counts each entry as a line; a bad entry is named by its
  key (``file item '7': reason``) instead of a line number, under the same rule.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import re
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec
import pandas as pd

from cllm4rec_dist.errors import UserError

INTERACTION_COLUMNS = ("user", "item", "rating", "timestamp", "review")
MAX_EXAMPLES = 10


class InputError(UserError, ValueError):
    """Bad input. The message names the file (and line or field) and says how to fix it."""


@dataclass
class InputReport:
    """Counts what a reader read and skipped, and enforces the bad-input rule."""

    strict: bool = False
    max_bad_fraction: float = 0.1
    lines_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    empty_text: int = 0
    examples: list[str] = field(default_factory=list)
    counted: Counter = field(default_factory=Counter)
    """What a reader dropped or noted that is not a bad line (e.g. ``users_without_interactions`` of a given
    split); in ``stats.json`` under ``input.counted`` when any."""
    _bad_in_file: Counter = field(default_factory=Counter)
    _lines_in_file: Counter = field(default_factory=Counter)

    def line(self, path: str) -> None:
        """Count one data line read from ``path`` (call before parsing it)."""
        self.lines_read += 1
        self._lines_in_file[path] += 1

    def bad(self, path: str, lineno: int | str, reason: str, detail: str = "") -> None:
        """Record a bad line: raise in strict mode, else skip and count it.

        ``lineno``: the line number, or for an entry of a JSON map the words that name it (``item '7'``)."""
        line = isinstance(lineno, int)
        where = (f"{path}:{lineno}: " if line else f"{path} {lineno}: ") + reason + (f" ({detail})" if detail else "")
        if self.strict:
            what = "line" if line else "entry"
            raise InputError(f"{where}. Fix or delete the {what}, or run without --strict to skip such {what}s.")
        self.skipped[reason] += 1
        self._bad_in_file[path] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(where)

    def text(self, value) -> str:
        """Normalise a text field; empty text is kept as '' and counted."""
        cleaned = clean_text(value)
        if not cleaned:
            self.empty_text += 1
        return cleaned

    def finish_file(self, path: str) -> None:
        """Reject a file whose bad-line share says the format or columns are wrong."""
        total = self._lines_in_file[path]
        bad = self._bad_in_file[path]
        if total == 0:
            raise InputError(f"{path}: no data lines. Check the path and --format.")
        if bad / total > self.max_bad_fraction:
            first = next((e for e in self.examples if e.startswith((f"{path}:", f"{path} "))), "")
            raise InputError(
                f"{path}: {bad} of {total} lines are bad (more than {self.max_bad_fraction:.0%}); "
                f"first: {first}. This is usually the wrong --format or column names."
            )

    def as_dict(self) -> dict:
        out = {
            "lines_read": self.lines_read,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": int(sum(self.skipped.values())),
            "empty_text": self.empty_text,
            "examples": list(self.examples),
        }
        if self.counted:
            out["counted"] = dict(sorted(self.counted.items()))
        return out


_WS = re.compile(r"\s+")


def clean_text(value) -> str:
    """Strip and collapse whitespace; None/NaN become ''."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    # Same result as _WS.sub(" ", text).strip() (re's \s is exactly str.isspace), about 4x faster.
    return " ".join(str(value).split())


@dataclass
class RawDataset:
    """A reader's output, before the protocol (binarise, k-core, split) runs.

    ``interactions`` has the columns of ``INTERACTION_COLUMNS``: ``user`` and
    ``item`` are the ORIGINAL ids as strings; ``rating`` is float (NaN when the
    source has none); ``timestamp`` is float seconds (NaN when unknown);
    ``review`` is the review text ('' when none). Row order is file order.
    """

    name: str
    interactions: pd.DataFrame
    user_texts: dict[str, str] = field(default_factory=dict)
    item_texts: dict[str, str] = field(default_factory=dict)
    item_titles: dict[str, str] = field(default_factory=dict)
    """Short item names (a movie's title, a product's name): what an LLM prompt shows for an item.
    ``item_texts`` is the longer description. Items without a title fall back to their original id later."""
    has_ratings: bool = True
    report: InputReport = field(default_factory=InputReport)
    given_split: str | None = None
    """None: the protocol splits. ``"random"`` / ``"leave-one-out"``: the data already holds a split of that kind
    (the papers' released splits), in an extra ``part`` column (train / valid / test), used as given."""
    item_catalogue: list[str] | None = None
    """Every item id of a given catalogue, those without any interaction too (None: the items that occur)."""

    @staticmethod
    def frame(rows: list[tuple]) -> pd.DataFrame:
        """Build the interactions frame from (user, item, rating, timestamp, review) tuples."""
        df = pd.DataFrame(rows, columns=list(INTERACTION_COLUMNS))
        return df.astype({"user": str, "item": str, "rating": float, "timestamp": float, "review": str})


# --- Small helpers shared by the readers (files through fsspec, numbers, dates) ---

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


# What a damaged compressed file raises while it is read (gzip, bz2, xz, zstd through fsspec's codecs).
_DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, OSError)


@contextmanager
def open_binary(path: str):
    """Open a local path or fsspec URL for reading bytes, decompressing when needed.

    gzip is recognised by its magic bytes as well as by the ``.gz`` suffix (Amazon
    dumps are sometimes renamed); other codecs by suffix (fsspec's ``infer``). A file
    that ends early or is damaged while being read is an ``InputError`` naming it.
    """
    codec = fsspec.utils.infer_compression(path)
    with fsspec.open(path, "rb", compression=None if codec == "gzip" else codec) as raw:
        head = raw.read(2)
        raw.seek(0)
        try:
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=raw) as unzipped:
                    yield unzipped
            else:
                yield raw
        except _DAMAGED as err:
            if isinstance(err, OSError) and type(err) not in (OSError, gzip.BadGzipFile):
                raise  # FileNotFoundError & co. name their own file
            raise InputError(f"{path}: damaged or truncated ({type(err).__name__}: {err}); download or copy it "
                             "again.") from None


def decoded_lines(binary, encoding: str = "utf-8"):
    """(line number, text or None, problem) for each line of a binary file; None when it is not ``encoding``."""
    for lineno, raw_line in enumerate(binary, 1):
        try:
            yield lineno, raw_line.decode(encoding), ""
        except UnicodeDecodeError as err:
            yield lineno, None, f"not {encoding} at byte {err.start}"


def text_lines(binary, path: str, report: InputReport, encoding: str = "utf-8"):
    """(line number, decoded line) for each line of a binary file.

    A line that is not valid ``encoding`` is a bad line (``invalid_encoding``): skipped and counted, or an
    error with --strict. Decoding with replacement characters would silently merge distinct ids.
    """
    for lineno, text, problem in decoded_lines(binary, encoding):
        if text is None:
            report.line(path)
            report.bad(path, lineno, "invalid_encoding", problem)
        else:
            yield lineno, text


def json_records(path: str, report: InputReport, parse=json.loads, parse_errors=(ValueError,)):
    """Yield (line number, object) for each JSON-object line of a (gzipped) JSON-lines file.

    Blank lines are ignored; a line ``parse`` rejects, or that is not an object, is a
    ``bad_json`` bad line; the file's bad-line share is checked at the end.
    """
    with open_binary(path) as raw:
        for lineno, line in text_lines(raw, path, report):
            if not line.strip():
                continue
            report.line(path)
            try:
                obj = parse(line)
            except parse_errors as err:
                report.bad(path, lineno, "bad_json", str(err))
                continue
            if not isinstance(obj, dict):
                report.bad(path, lineno, "bad_json", f"expected an object, got {type(obj).__name__}")
                continue
            yield lineno, obj
    report.finish_file(path)


def join_path(folder: str, name: str) -> str:
    """``folder/name`` for local paths and URLs alike."""
    return folder.rstrip("/") + "/" + name


def is_dir(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.isdir(root)


def exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


def base_name(path: str) -> str:
    """Dataset name from a path: last component without data/compression suffixes."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _COMPRESSION_SUFFIXES + (".json", ".jsonl", ".csv", ".tsv", ".tab", ".txt", ".parquet", ".zip"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def to_number(value) -> float | None:
    """A finite float, or None when ``value`` is missing, non-numeric, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def dates_to_seconds(values: list[str]) -> list[float]:
    """Parse date strings to float unix seconds (NaN where unparseable); naive dates count as UTC.

    Vectorised: a per-row ``pd.to_datetime`` costs ~30 us, i.e. seconds for 300k
    rows. The common single-format case is parsed in one call; leftovers are
    retried with ``format="mixed"``.
    """
    if not values:
        return []
    parsed = pd.to_datetime(pd.Series(values, dtype=object), errors="coerce", utc=True)
    missing = parsed.isna().to_numpy()
    if missing.any():
        retry = pd.to_datetime(pd.Series(values, dtype=object)[missing], errors="coerce", utc=True, format="mixed")
        parsed = parsed.copy()
        parsed[missing] = retry
    seconds = (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return seconds.astype(float).tolist()


def read_json_file(path: str, what: str):
    """A whole JSON file (local path or URL, optionally compressed); bad JSON is an ``InputError`` naming it."""
    with open_binary(path) as raw:
        blob = raw.read()
    try:
        return json.loads(blob)
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err}); {what}.") from None


def one_input_folder(options, layout: str) -> str:
    """The one folder a folder-format reader takes as --input (``layout``: what that folder holds)."""
    if len(options.inputs) != 1 or not is_dir(options.inputs[0]):
        raise InputError(f"{', '.join(options.inputs)}: {layout}; pass that one folder as --input.")
    return options.inputs[0]


def read_json_object(path: str, what: str) -> dict:
    """``read_json_file`` that must hold an object."""
    value = read_json_file(path, what)
    if not isinstance(value, dict):
        raise InputError(f"{path}: holds a JSON {type(value).__name__}, not an object; {what}.")
    return value


def read_title_map(path: str, known_items: set[str], report: InputReport) -> dict[str, str]:
    """Item titles from a JSON object ``{item id: title}``: a string, or an object with ``"title"`` (A-LLMRec's
    ``{"asin", "title"}`` records). A null or empty title leaves the item untitled (shown by its id later,
    ``items_without_title``). Each entry is a line of the bad-input rule: a value of another type
    (``bad_title``) or an id the interactions do not hold (``unknown_item``: the map belongs to another dataset
    or id space) is skipped and counted, more than 10% of them rejects the file."""
    entries = read_json_object(path, "--item-titles is a JSON object {item id: title or {\"title\": ...}}")
    titles: dict[str, str] = {}
    for key, value in entries.items():
        report.line(path)
        title = value.get("title") if isinstance(value, dict) else value
        if not (title is None or isinstance(title, str)):
            report.bad(path, f"item {key!r}", "bad_title",
                       f"{type(value).__name__} value; expected a string or an object with a string 'title'")
            continue
        if key not in known_items:
            report.bad(path, f"item {key!r}", "unknown_item", "no interaction of the input holds this item id")
            continue
        title = clean_text(title)
        if title:
            titles[key] = title
    report.finish_file(path)
    return titles
