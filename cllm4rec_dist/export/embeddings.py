"""Export a trained CLLM4Rec's user/item embeddings with their ORIGINAL ids (spec §15).

The learned token embeddings are the product downstream systems consume (the
paper's CLLM4Rec-Emb feeds them, projected to 128 dimensions, to a two-tower
retrieval model), so they leave the training system in plain, self-describing
files keyed by the ids of the raw data, not by internal indices.

Layout of an export folder (local path or any fsspec URL)::

    users.parquet          user_id (original id, string), user_index (int64),
                           collab, content[, rec]              (list<float32> each)
    items.parquet          item_id, item_index, collab, content[, head]
    user_ids.npy           (I,) unicode array: user_ids[k] is the original id of row k
    item_ids.npy           (J,) unicode array
    users_collab.npy       (I, D) float32, row k = user_ids[k]; likewise users_content,
    users_content.npy      users_rec, items_collab, items_content, items_head
    ...
    projection.npz         only with ``dim``: per table T, ``T_mean`` (d,) and
                           ``T_components`` (d, D); exported = (original - mean) @ components
    export.json            written LAST: what was exported, from which checkpoint and weights,
                           dims, projection, and each file's size and sha256

Tables:

* ``collab`` / ``content``: the collaborative (Z^l) and content (Z^c) token embeddings.
* ``rec`` (users, optional): the finetuned RecLLM's user representation, i.e. the hidden
  state of the last prompt token over the user's TRAIN items (recommenders/cllm4rec/evaluate.py). It needs
  the backbone, so ``user_vectors=False`` skips it.
* ``head`` (items, only for models with a separate item head, e.g. LLaMA): the item scoring
  vectors. For tied backbones (GPT-2) the scoring vectors ARE ``collab``; export.json says so.

Weights: the best-validation copy stored in the checkpoint when there is one (and
``use_best``), else the last trained state; export.json records which.

Projection (``dim``): PCA fitted separately per table (center, then the top-``dim``
right singular vectors of the centered table, float64 SVD, signs fixed so the largest
entry of each component is positive: deterministic). Projecting each table separately
keeps every feature block's own geometry but does NOT preserve dot products between
tables (e.g. ``rec`` x ``head`` scores); use an unprojected export for scoring.

Every file is written under a temporary name and renamed into place; export.json goes
last (and an older one is removed first), so a folder with export.json is a whole export.

Row-sharded checkpoints (model.table_sharding / item_head_sharding ``row``) are exported PART BY PART: one
``users-part-NNNNN.parquet`` / ``items-part-NNNNN.parquet`` per row range a rank saved (same columns as
``users.parquet``, original ids included), each read from the checkpoint's sharded part alone, so no process
ever holds a whole table. No NumPy arrays, no PCA (``dim``) and no ``rec`` user vectors there: each needs whole
tables; ``export.json`` lists the parts (``read_export`` concatenates them for consumers that want arrays).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field

import numpy as np
import torch

from cllm4rec_dist.atomic import atomic_write, url_to_fs
from cllm4rec_dist.data.records import InputError

FORMAT = "cllm4rec-export"
VERSION = 1
EXPORT_FILE = "export.json"
PROJECTION_FILE = "projection.npz"

ID_COLUMN = {"users": "user_id", "items": "item_id"}
INDEX_COLUMN = {"users": "user_index", "items": "item_index"}


class ExportError(InputError):
    """A source that is not a usable checkpoint, or export settings that cannot work; says what to pass instead."""


# --------------------------------------------------------------------------- export folders


# --------------------------------------------------------------------------- projection


def fit_pca(table: torch.Tensor, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (d,), components (d, dim), explained variance (dim,)) of ``table`` (N, d), deterministic.

    float64 SVD of the centered table; when ``dim`` exceeds its rank (N < dim) the remaining
    components complete an orthonormal basis (zero variance). Component signs are fixed so
    the largest-magnitude entry of each is positive, which makes reruns bit-identical
    whatever sign the SVD routine picks.
    """
    x = table.detach().to(torch.float64).cpu()
    n, d = x.shape
    if dim > d:
        raise ExportError(f"dim={dim} is larger than the embedding size {d}; pass --dim <= {d} (or none).")
    mean = x.mean(dim=0)
    centered = x - mean
    _, s, vh = torch.linalg.svd(centered, full_matrices=dim > min(n, d))
    components = vh[:dim].T.clone()  # (d, dim)
    signs = torch.sign(components[components.abs().argmax(dim=0), torch.arange(dim)])
    components *= torch.where(signs == 0, torch.ones_like(signs), signs)
    variance = torch.zeros(dim, dtype=torch.float64)
    k = min(dim, s.numel())
    variance[:k] = s[:k] ** 2 / max(n - 1, 1)
    return mean.numpy(), components.numpy(), variance.numpy()


def project(table: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Project vectors (N, d) with a saved PCA: (x - mean) @ components, float32 (N, dim)."""
    return ((np.asarray(table, dtype=np.float64) - mean) @ components).astype(np.float32)


# --------------------------------------------------------------------------- writing


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def parquet_bytes(entity: str, ids: list[str], tables: dict[str, np.ndarray], first_index: int = 0) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {ID_COLUMN[entity]: pa.array(ids, type=pa.string()),
               INDEX_COLUMN[entity]: pa.array(np.arange(first_index, first_index + len(ids), dtype=np.int64))}
    for name, matrix in tables.items():
        n, d = matrix.shape
        offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32) if n else np.zeros(1, dtype=np.int32))
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), type=pa.float32()))
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


class ExportWriter:
    """Atomic writes into the export folder, recording each file's size and checksum."""

    def __init__(self, out_dir: str):
        self.fs, self.root = url_to_fs(out_dir)
        self.fs.makedirs(self.root, exist_ok=True)
        self.files: dict[str, dict] = {}
        self._remove_previous()

    def _remove_previous(self) -> None:
        """Drop an older export here first (its export.json first), so old and new files never pass as one export."""
        path = posixpath.join(self.root, EXPORT_FILE)
        if not self.fs.exists(path):
            return
        try:
            previous = json.loads(self.fs.cat_file(path)).get("files", {})
        except ValueError:
            previous = {}
        self.fs.rm(path)
        for name in previous:
            target = posixpath.join(self.root, name)
            if ".." not in name.split("/") and not name.startswith("/") and self.fs.exists(target):
                self.fs.rm(target)

    def write(self, name: str, data: bytes) -> None:
        if "/" in name:  # a file of a subfolder (the PEFT adapter's)
            self.fs.makedirs(posixpath.join(self.root, posixpath.dirname(name)), exist_ok=True)
        atomic_write(self.fs, posixpath.join(self.root, name), data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class ExportedTables:
    """What a recommender's export hook gives (recommenders/<name>/export.py): entity ("users" / "items") -> table
    name -> (rows, dim) float32 in id_maps.json order, what each table is, and which item table scores items."""

    tables: dict[str, dict[str, np.ndarray]]
    origin: dict[str, dict[str, str]]
    item_scoring: str
    extra: dict = field(default_factory=dict)
    """Recommender-specific keys added to export.json (e.g. the prompt style of CLLM4Rec's user vectors)."""


def write_export(out_dir: str, ids: dict[str, list[str]], exported: ExportedTables, dim: int | None,
                 record: dict, where: str, extra_files: dict[str, bytes] | None = None) -> dict:
    """Write every table (optionally PCA-projected to ``dim``) with its original ids, then export.json LAST; returns
    export.json's content. ``record``: what export.json says of the source (source, weights, best, ...);
    ``where`` names the checkpoint and dataset in errors; ``extra_files``: more files by relative name (e.g. the
    backbone adapter in PEFT's format, ``adapter/...``), written before export.json and listed in it."""
    tables, origin = exported.tables, exported.origin
    for entity, by_name in tables.items():
        for name, matrix in by_name.items():
            if matrix.shape[0] != len(ids[entity]):
                raise ExportError(f"{where}: {entity} table {name} has {matrix.shape[0]} rows but id_maps.json lists "
                                  f"{len(ids[entity])} {entity}: the checkpoint was trained on another dataset. Pass "
                                  "the right one with --data.")
    hidden = min(m.shape[1] for by_name in tables.values() for m in by_name.values())
    if dim is not None and dim > hidden:
        raise ExportError(f"dim={dim} is larger than the embedding size {hidden} (the smallest exported table) of "
                          f"{where}; pass --dim <= {hidden} (or none).")
    projection: dict[str, np.ndarray] = {}
    variance_kept: dict[str, float] = {}
    if dim is not None:
        for entity, by_name in tables.items():
            for name, matrix in by_name.items():
                key = f"{entity}_{name}"
                mean, components, variance = fit_pca(torch.from_numpy(matrix), dim)
                projection[f"{key}_mean"], projection[f"{key}_components"] = mean, components
                projection[f"{key}_explained_variance"] = variance
                total = float(np.var(matrix.astype(np.float64), axis=0, ddof=1).sum()) if len(matrix) > 1 else 0.0
                variance_kept[key] = round(float(variance.sum()) / total, 6) if total > 0 else 1.0
                by_name[name] = project(matrix, mean, components)

    writer = ExportWriter(out_dir)
    for entity in ("users", "items"):
        writer.write(f"{entity[:-1]}_ids.npy", npy_bytes(np.asarray(ids[entity], dtype=str)))
        for name, matrix in tables[entity].items():
            writer.write(f"{entity}_{name}.npy", npy_bytes(np.ascontiguousarray(matrix, dtype=np.float32)))
        writer.write(f"{entity}.parquet", parquet_bytes(entity, ids[entity], tables[entity]))
    for name, data in (extra_files or {}).items():
        writer.write(name, data)
    if projection:
        buf = io.BytesIO()
        np.savez(buf, **projection)
        writer.write(PROJECTION_FILE, buf.getvalue())

    manifest = {
        "format": FORMAT, "version": VERSION, **record,
        "num_users": len(ids["users"]), "num_items": len(ids["items"]),
        "hidden_size": hidden, "dim": dim if dim is not None else hidden,
        "tables": {entity: {name: {"dim": int(m.shape[1]), "from": origin[entity][name]} for name, m in by.items()}
                   for entity, by in tables.items()},
        "item_scoring": exported.item_scoring,
        **exported.extra,
        "projection": None if dim is None else {
            "method": "pca", "file": PROJECTION_FILE, "dim": dim,
            "formula": "projected = (original - <table>_mean) @ <table>_components",
            "explained_variance_ratio": variance_kept},
        "layout": {"ids": "user_ids.npy / item_ids.npy: row k of every users_*/items_* array",
                   "parquet": "users.parquet (user_id, user_index, tables...), "
                              "items.parquet (item_id, item_index, ...)"},
        "files": writer.files,
    }
    write_manifest(writer, manifest)
    return manifest


def write_manifest(writer: ExportWriter, manifest: dict) -> None:
    """export.json, written last: a folder that has it holds a whole export."""
    atomic_write(writer.fs, posixpath.join(writer.root, EXPORT_FILE),
                 json.dumps(manifest, indent=1, sort_keys=False, default=str).encode("utf-8"))


def read_export(export_dir: str) -> tuple[dict, dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
    """(export.json, {"users": ids, "items": ids}, {"users": {table: (N, D)}, "items": {...}}) of an export folder."""
    fs, root = url_to_fs(export_dir)
    path = posixpath.join(root, EXPORT_FILE)
    if not fs.exists(path):
        raise ExportError(f"{export_dir}: no {EXPORT_FILE}; not a finished export. Run `cllm4rec export "
                          f"--checkpoint RUN --out {export_dir}`.")
    manifest = json.loads(fs.cat_file(path))
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} file.")

    def load(name: str) -> np.ndarray:
        return np.load(io.BytesIO(fs.cat_file(posixpath.join(root, name))), allow_pickle=False)

    if manifest.get("layout", {}).get("sharded"):  # parts in row order, concatenated
        import pyarrow.parquet as pq

        ids, tables = {}, {}
        for entity, parts in manifest["layout"]["parts"].items():
            frames = [pq.read_table(io.BytesIO(fs.cat_file(posixpath.join(root, p["file"])))) for p in parts]
            ids[entity] = [str(x) for f in frames for x in f.column(ID_COLUMN[entity]).to_pylist()]
            tables[entity] = {name: np.concatenate([np.asarray(f.column(name).to_pylist(), dtype=np.float32)
                                                    for f in frames]) for name in manifest["tables"][entity]}
        return manifest, ids, tables

    ids = {"users": [str(x) for x in load("user_ids.npy")], "items": [str(x) for x in load("item_ids.npy")]}
    tables = {entity: {name: load(f"{entity}_{name}.npy") for name in manifest["tables"][entity]}
              for entity in ("users", "items")}
    return manifest, ids, tables


__all__ = ["ExportError", "ExportWriter", "ExportedTables", "fit_pca", "project", "read_export", "write_export"]
