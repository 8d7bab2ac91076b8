"""S3-Rec sequence files (``Beauty.txt`` etc. from the CIKM 2020 S3-Rec repo).

One user per line: ``user item item ...``, whitespace-separated ids, items in
time order. The files carry no ratings (``has_ratings=False``, rating NaN, so
the protocol does not binarise) and no text. The timestamp of an interaction is
its position in the user's sequence (0, 1, 2, ...), which keeps the
chronological order through the protocol's sort. A line with fewer than two
fields (a user without items) is a bad line (``wrong_field_count``).

``--item-titles FILE`` adds item titles from a JSON map keyed by the file's item ids (values: a title, or an
object with ``"title"``, e.g. ``amazon-2014-titles/beauty_items.json``; ``records.read_title_map`` has the
rules), so a leave-one-out S3-Rec dataset shows titled candidates to the LLM.
"""

from __future__ import annotations

import math

from cllm4rec_dist.data.records import InputReport, RawDataset, base_name, open_binary, read_title_map, text_lines


def read(options, report: InputReport) -> RawDataset:
    rows: list[tuple] = []
    for path in options.inputs:
        with open_binary(path) as raw:
            for lineno, line in text_lines(raw, path, report):
                fields = line.split()
                if not fields:
                    continue
                report.line(path)
                if len(fields) < 2:
                    report.bad(path, lineno, "wrong_field_count", f"user {fields[0]!r} has no items")
                    continue
                user = fields[0]
                rows.extend((user, item, math.nan, float(pos), "") for pos, item in enumerate(fields[1:]))
        report.finish_file(path)
    interactions = RawDataset.frame(rows)
    titles = read_title_map(options.item_titles, set(interactions["item"]), report) if options.item_titles else {}
    return RawDataset(name=base_name(options.inputs[0]), interactions=interactions, item_titles=titles,
                      has_ratings=False, report=report)
