"""S3-Rec sequence files (``Beauty.txt`` etc. from the CIKM 2020 S3-Rec repo).

One user per line: ``user item item ...``, whitespace-separated ids, items in
time order. The files carry no ratings (``has_ratings=False``, rating NaN, so
the protocol does not binarise) and no text. The timestamp of an interaction is
its position in the user's sequence (0, 1, 2, ...), which keeps the
chronological order through the protocol's sort. A line with fewer than two
fields (a user without items) is a bad line (``wrong_field_count``).
"""

from __future__ import annotations

import math

from cllm4rec_dist.data.records import InputReport, RawDataset, base_name, open_binary, text_lines


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
    return RawDataset(name=base_name(options.inputs[0]), interactions=RawDataset.frame(rows), has_ratings=False,
                      report=report)
