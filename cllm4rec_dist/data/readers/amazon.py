"""Amazon review JSON-lines (McAuley lab 2014 and 2018 dumps), plain or gzip.

One review per line with ``reviewerID`` (user), ``asin`` (item), ``overall``
(rating 1-5), ``reviewText``, ``summary`` and ``unixReviewTime``; the 2014 and
2018 dumps use the same names for these fields. Several ``--input`` files are
read in order and concatenated (e.g. two categories).

Review text = ``summary + ". " + reviewText`` when both are non-empty (the
summary is a one-line title worth keeping; the ". " is left out when the summary
already ends in . ! or ?), else whichever exists. A missing ``unixReviewTime``
gives timestamp NaN (the protocol then keeps file order).

``--meta`` files are Amazon item metadata, one item per line with ``asin``,
``title`` and ``description`` (a string or a list of strings). The 2018
metadata is JSON; the 2014 metadata is one Python dict literal per line (single
quotes), so each line is tried with ``json.loads`` and then
``ast.literal_eval``. Item text = "title. description" (or whichever exists), item title = ``title``;
only items that occur in the reviews are kept, since metadata files list the
whole catalogue.
"""

from __future__ import annotations

import ast
import json
import math

from cllm4rec_dist.data.records import InputReport, RawDataset, base_name, clean_text, json_records, to_number


def read(options, report: InputReport) -> RawDataset:
    rows: list[tuple] = []
    for path in options.inputs:
        rows.extend(_read_reviews(path, report))
    items = {row[1] for row in rows}
    item_texts: dict[str, str] = {}
    item_titles: dict[str, str] = {}
    for path in options.meta:
        texts, titles = _read_meta(path, items, report)
        item_texts.update(texts)
        item_titles.update(titles)
    return RawDataset(
        name=base_name(options.inputs[0]),
        interactions=RawDataset.frame(rows),
        item_texts=item_texts,
        item_titles=item_titles,
        has_ratings=True,
        report=report,
    )


def join_sentences(first: str, second: str) -> str:
    """'first. second', without doubling the full stop; whichever exists if one is empty."""
    if first and second:
        return first + (" " if first[-1] in ".!?" else ". ") + second
    return first or second


def _read_reviews(path: str, report: InputReport) -> list[tuple]:
    rows = []
    for lineno, obj in json_records(path, report):
        row = _review_row(obj, path, lineno, report)
        if row is not None:
            rows.append(row)
    return rows


def _review_row(obj: dict, path: str, lineno: int, report: InputReport) -> tuple | None:
    for name in ("reviewerID", "asin", "overall"):
        if obj.get(name) is None:
            report.bad(path, lineno, f"missing_field:{name}")
            return None
    user, item = str(obj["reviewerID"]).strip(), str(obj["asin"]).strip()
    if not user or not item:
        report.bad(path, lineno, "empty_id", "reviewerID" if not user else "asin")
        return None
    rating = to_number(obj["overall"])
    if rating is None:
        report.bad(path, lineno, "non_numeric_rating", repr(obj["overall"]))
        return None
    timestamp = to_number(obj.get("unixReviewTime"))
    review = report.text(join_sentences(clean_text(obj.get("summary")), clean_text(obj.get("reviewText"))))
    return (user, item, rating, math.nan if timestamp is None else timestamp, review)


def parse_meta_line(line: str):
    """A metadata line as a dict: JSON (2018) or a Python dict literal (2014)."""
    try:
        return json.loads(line)
    except ValueError:
        return ast.literal_eval(line)


def _read_meta(path: str, items: set[str], report: InputReport) -> tuple[dict[str, str], dict[str, str]]:
    """(item texts, item titles) of the metadata lines whose asin is in ``items``."""
    texts, titles = {}, {}
    for lineno, obj in json_records(path, report, parse_meta_line,
                                    (ValueError, SyntaxError, MemoryError, RecursionError)):
        asin = clean_text(obj.get("asin"))
        if not asin:
            report.bad(path, lineno, "missing_field:asin")
            continue
        if asin not in items:
            continue
        description = obj.get("description")
        if isinstance(description, list):
            description = " ".join(clean_text(part) for part in description)
        title = clean_text(obj.get("title"))
        texts[asin] = report.text(join_sentences(title, clean_text(description)))
        if title:
            titles[asin] = title
    return texts, titles
