"""A released user x item split, used as given: the CLLM4Rec authors' Amazon Beauty / Sports.

``--input`` is a folder holding

* ``train_matrix.npz``, ``val_matrix.npz``, ``test_matrix.npz``: scipy sparse matrices saved with
  ``scipy.sparse.save_npz`` (rows = users 0..U-1, columns = items 0..I-1, value 1 = interaction);
* ``meta.json``: ``{"num_users": U, "num_items": I}``;
* optionally ``item_tags.json``: item id -> list of tag strings, written as the item's text
  (``Tags: Face, Mineral, Foundation``).

The split is the data's (``RawDataset.given_split = "random"``: any number of held-out items per user, the
full-ranking protocol): no binarising, no k-core, no re-split. Every item of ``meta.json`` stays in the catalogue,
with or without interactions; a user without any interaction in the three matrices has no documents and is
dropped (``input.counted.users_without_interactions``). Users keep their matrix row as original id, items their
column. Train items follow in column order, then the valid and the test items.

Loading never runs code: the ``.npz`` arrays are read with ``allow_pickle=False`` (an object array is refused
naming the file). Refused, one line naming the file and the fix: a missing file, a matrix whose shape differs from
``meta.json``, a value other than 1 (or a NaN), a (user, item) pair in two of the matrices (the files come from
different splits; a held-out pair in train would leak), a ``meta.json`` without positive whole ``num_users`` /
``num_items``. ``item_tags.json`` entries follow the bad-line rule (``records.py``): an item id outside
``[0, num_items)`` (``unknown_item``) or a value that is not a list of strings (``bad_tags``) is skipped and counted,
more than 10% of them rejects the file; an empty tag list is an item without text (``empty_text``).
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from cllm4rec_dist.data.records import (
    InputError,
    InputReport,
    RawDataset,
    base_name,
    clean_text,
    exists,
    join_path,
    one_input_folder,
    open_binary,
    read_json_object,
)

MATRICES = (("train", "train_matrix.npz"), ("valid", "val_matrix.npz"), ("test", "test_matrix.npz"))
META_FILE = "meta.json"
TAGS_FILE = "item_tags.json"
LAYOUT = ("--format split-npz reads a folder with train_matrix.npz, val_matrix.npz, test_matrix.npz (scipy.sparse."
          "save_npz) and meta.json (num_users, num_items)")


def read_meta(path: str) -> tuple[int, int]:
    meta = read_json_object(path, LAYOUT)
    sizes = []
    for key in ("num_users", "num_items"):
        value = meta.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise InputError(f"{path}: {key} is {value!r}, not a whole number > 0; write the matrices' "
                             f"{'rows' if key == 'num_users' else 'columns'} count there.")
        sizes.append(value)
    return sizes[0], sizes[1]


def load_matrix(path: str, shape: tuple[int, int], meta_path: str):
    """One split matrix as a canonical CSR, checked: the shape of ``meta.json`` and binary values."""
    import scipy.sparse as sp

    with open_binary(path) as raw:
        blob = raw.read()
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        matrix = sp.load_npz(io.BytesIO(blob))  # scipy reads with allow_pickle=False as well
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise InputError(f"{path}: holds Python objects (an object array), which are never unpickled here; "
                             "save the matrix with scipy.sparse.save_npz.") from None
        raise InputError(f"{path}: not a scipy sparse matrix ({err}); save it with scipy.sparse.save_npz.") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise InputError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); copy it again or save it "
                         "with scipy.sparse.save_npz.") from None
    data = arrays.get("data")
    if data is None or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        kind = "no data array" if data is None else f"values of type {data.dtype}"
        raise InputError(f"{path}: {kind}; the matrices hold numbers (1 = interaction).")
    if matrix.shape != shape:
        raise InputError(f"{path}: shape {matrix.shape[0]} x {matrix.shape[1]}, but {meta_path} says num_users x "
                         f"num_items = {shape[0]} x {shape[1]}; the files belong to different datasets.")
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()
    values = matrix.data
    wrong = np.flatnonzero(~(values == 1))
    if len(wrong):
        k = int(wrong[0])
        user = int(np.searchsorted(matrix.indptr, k, side="right") - 1)
        item = int(matrix.indices[k])
        raise InputError(f"{path}: entry (user {user}, item {item}) is {float(values[k])!r}; the matrices "
                         f"are binary (1 = interaction; {len(wrong)} entries are not). Store 1 for each interaction "
                         "(and no explicit zeros).")
    return matrix


def check_disjoint(matrices: dict, paths: dict[str, str]) -> None:
    """A (user, item) pair in two of the matrices: the split's parts must not overlap."""
    parts = list(matrices)
    for a_index, a in enumerate(parts):
        for b in parts[a_index + 1:]:
            both = matrices[a].multiply(matrices[b]).tocoo()
            if both.nnz:
                user, item = int(both.row[0]), int(both.col[0])
                raise InputError(f"{paths[b]}: {both.nnz} (user, item) pairs are also in {paths[a]}, first (user "
                                 f"{user}, item {item}); the parts of a split are disjoint: the files come from "
                                 "different splits.")


def read_tags(path: str, num_items: int, report: InputReport) -> dict[str, str]:
    """``Tags: t1, t2, ...`` item texts from ``item_tags.json`` (item id -> list of tag strings)."""
    entries = read_json_object(path, "item_tags.json is a JSON object {item id: [tag, ...]}")
    texts: dict[str, str] = {}
    for key, tags in entries.items():
        report.line(path)
        where = f"item {key!r}"
        if not (key.isdigit() and int(key) < num_items):
            report.bad(path, where, "unknown_item", f"item ids are 0..{num_items - 1} (meta.json num_items)")
            continue
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            report.bad(path, where, "bad_tags", f"{type(tags).__name__} value; expected a list of tag strings")
            continue
        words = [w for w in (clean_text(t) for t in tags) if w]
        text = report.text(f"Tags: {', '.join(words)}" if words else "")
        if text:
            texts[str(int(key))] = text
    report.finish_file(path)
    return texts


def read(options, report: InputReport) -> RawDataset:
    import pandas as pd

    folder = one_input_folder(options, LAYOUT)
    meta_path = join_path(folder, META_FILE)
    for name in [META_FILE] + [file for _, file in MATRICES]:
        if not exists(join_path(folder, name)):
            raise InputError(f"{join_path(folder, name)}: missing; {LAYOUT}.")
    num_users, num_items = read_meta(meta_path)
    paths = {part: join_path(folder, file) for part, file in MATRICES}
    matrices = {part: load_matrix(path, (num_users, num_items), meta_path) for part, path in paths.items()}
    check_disjoint(matrices, paths)

    frames = []
    for order, (part, matrix) in enumerate(matrices.items()):
        coo = matrix.tocoo()  # canonical CSR -> row-major, columns ascending: the "file order"
        report.lines_read += int(coo.nnz)
        frames.append(pd.DataFrame({"user": coo.row.astype(np.int64).astype(str),
                                    "item": coo.col.astype(np.int64).astype(str),
                                    "rating": np.nan, "timestamp": float(order), "review": "", "part": part}))
    interactions = pd.concat(frames, ignore_index=True)
    active = np.zeros(num_users, bool)
    for matrix in matrices.values():
        active |= np.diff(matrix.indptr) > 0
    if (~active).sum():
        report.counted["users_without_interactions"] = int((~active).sum())
    tags = join_path(folder, TAGS_FILE)
    item_texts = read_tags(tags, num_items, report) if exists(tags) else {}
    return RawDataset(name=base_name(folder), interactions=interactions, item_texts=item_texts, has_ratings=False,
                      report=report, given_split="random", item_catalogue=[str(i) for i in range(num_items)])
