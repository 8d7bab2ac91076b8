"""Yelp Open Dataset reviews (``yelp_academic_dataset_review.json``), JSON-lines, plain or gzip.

One review per line: ``user_id`` (user), ``business_id`` (item), ``stars``
(rating), ``text`` (review) and an optional ``date`` ("2016-03-09 00:00:00").
Dates are parsed in one vectorised ``pandas.to_datetime`` call after the file
is read (per-line parsing would take seconds); naive dates count as UTC and an
unparseable or missing date gives timestamp NaN rather than dropping the review.
"""

from __future__ import annotations

from cllm4rec_dist.data.records import InputReport, RawDataset, base_name, dates_to_seconds, json_records, to_number


def read(options, report: InputReport) -> RawDataset:
    rows: list[tuple] = []
    for path in options.inputs:
        rows.extend(_read_file(path, report))
    return RawDataset(name=base_name(options.inputs[0]), interactions=RawDataset.frame(rows), has_ratings=True,
                      report=report)


def _read_file(path: str, report: InputReport) -> list[tuple]:
    rows, dates = [], []
    for lineno, obj in json_records(path, report):
        missing = next((name for name in ("user_id", "business_id", "stars") if obj.get(name) is None), None)
        if missing:
            report.bad(path, lineno, f"missing_field:{missing}")
            continue
        user, item = str(obj["user_id"]).strip(), str(obj["business_id"]).strip()
        if not user or not item:
            report.bad(path, lineno, "empty_id", "user_id" if not user else "business_id")
            continue
        rating = to_number(obj["stars"])
        if rating is None:
            report.bad(path, lineno, "non_numeric_rating", repr(obj["stars"]))
            continue
        rows.append((user, item, rating, report.text(obj.get("text"))))
        dates.append(str(obj.get("date") or ""))
    seconds = dates_to_seconds(dates)
    return [(user, item, rating, ts, review) for (user, item, rating, review), ts in zip(rows, seconds)]
