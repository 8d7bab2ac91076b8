"""A released leave-one-out split, used as given: LlamaRec's / A-LLMRec's Amazon Video Games.

``--input`` is a folder holding

* ``sequences.json``: ``{"train": {user: [item, ...]}, "val": {user: [item]}, "test": {user: [item]}}``, item ids
  in time order; ``val`` and ``test`` hold each user's held-out item (at most one each);
* optionally ``titles.json``: item id -> title (``records.read_title_map``: strings or ``{"title": ...}``).

``id_maps.json`` (reviewer IDs / ASINs -> these ids) may sit beside them and is not read: the ids stay as in
``sequences.json``. The split is the data's (``RawDataset.given_split = "leave-one-out"``): no binarising, no
k-core, no re-split; the stored candidates are drawn as for every leave-one-out dataset (``data/candidates.py``).
The timestamp of an interaction is its position in the user's train, val, test sequence. An item repeated in a
user's sequence is merged like every duplicate (the latest wins, ``duplicates_merged``), so a held-out item that
also sits in the history stays held out and leaves the history.

Each user is a line of the bad-input rule (``records.py``), named by its key: a train / val / test value that is
not a list of item ids (``bad_sequence``), a val or test list of more than one item (``not_leave_one_out``), a
val / test user without a train entry (``unknown_user``), a user without any item (``no_items``): the user is
skipped and counted, more than 10% of the users rejects the file. A missing file or part is an error naming it.
"""

from __future__ import annotations

import math

from cllm4rec_dist.data.records import (
    InputError,
    InputReport,
    RawDataset,
    base_name,
    exists,
    join_path,
    one_input_folder,
    read_json_object,
    read_title_map,
)

SEQUENCES_FILE = "sequences.json"
TITLES_FILE = "titles.json"
PARTS = (("train", "train"), ("val", "valid"), ("test", "test"))  # (key in the file, protocol part)
LAYOUT = ("--format sequences-json reads a folder with sequences.json ({\"train\": {user: [items]}, \"val\": ..., "
          "\"test\": ...}) and optionally titles.json")


def item_ids(value) -> list[str] | None:
    """The item ids of a sequence (JSON integers or digit strings) as strings, or None when it is not one."""
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
        elif isinstance(item, str) and item.strip():
            out.append(item.strip())
        else:
            return None
    return out


def read(options, report: InputReport) -> RawDataset:
    folder = one_input_folder(options, LAYOUT)
    path = join_path(folder, SEQUENCES_FILE)
    if not exists(path):
        raise InputError(f"{path}: missing; {LAYOUT}.")
    parts = read_json_object(path, LAYOUT)
    for key, _ in PARTS:
        if not isinstance(parts.get(key), dict):
            found = type(parts.get(key)).__name__ if key in parts else "missing"
            raise InputError(f"{path}: part {key!r} is {found}, not an object {{user: [item ids]}}; {LAYOUT}.")

    rows: list[tuple] = []
    held_out_users = set(parts["val"]) | set(parts["test"])
    for user in sorted(held_out_users - set(parts["train"])):
        report.line(path)
        report.bad(path, f"user {user!r}", "unknown_user", "in val/test but not in train")
    for user in parts["train"]:
        report.line(path)
        where = f"user {user!r}"
        sequences = []
        for key, part in PARTS:
            items = item_ids(parts[key].get(user, []))
            if items is None:
                report.bad(path, where, "bad_sequence", f"{key} is not a list of item ids")
                break
            if part != "train" and len(items) > 1:
                report.bad(path, where, "not_leave_one_out",
                           f"{key} holds {len(items)} items; val and test hold one held-out item per user")
                break
            sequences.append((part, items))
        else:
            if not any(items for _, items in sequences):
                report.bad(path, where, "no_items")
                continue
            position = 0
            for part, items in sequences:
                for item in items:
                    rows.append((user, item, math.nan, float(position), "", part))
                    position += 1
    report.finish_file(path)

    interactions = RawDataset.frame([row[:5] for row in rows])
    interactions["part"] = [row[5] for row in rows]
    titles_path = join_path(folder, TITLES_FILE)
    titles = read_title_map(titles_path, set(interactions["item"]), report) if exists(titles_path) else {}
    return RawDataset(name=base_name(folder), interactions=interactions, item_titles=titles, has_ratings=False,
                      report=report, given_split="leave-one-out")
