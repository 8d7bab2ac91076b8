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
  state of the last prompt token over the user's TRAIN items (eval/evaluate.py). It needs
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

import numpy as np
import torch

from cllm4rec_dist.atomic import atomic_write, url_to_fs
from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
from cllm4rec_dist.data.records import InputError
from cllm4rec_dist.train.checkpoint import (
    BEST,
    SHARDED_DIR,
    TRAINABLE,
    TRAINER_FILE,
    load_trainable,
    read_saved_weights,
    resolve_checkpoint,
    sharded_keys,
    sharded_parts,
)
from cllm4rec_dist.train.config import TrainConfig, config_from_dict

FORMAT = "cllm4rec-export"
VERSION = 1
EXPORT_FILE = "export.json"
PROJECTION_FILE = "projection.npz"

# (entity, table) -> parameter name in the checkpoint's trainable state
PARAMS = {
    ("users", "collab"): "collab_user_table.weight",
    ("users", "content"): "content_user_table.weight",
    ("items", "collab"): "collab_item_table.weight",
    ("items", "content"): "content_item_table.weight",
    ("items", "head"): "item_head.weight",
}
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


# --------------------------------------------------------------------------- the finetuned user vectors


def rec_user_vectors(cfg: TrainConfig, data: ShardedDataset, state: dict[str, torch.Tensor],
                     device: str | None = None) -> tuple[torch.Tensor, str]:
    """(I, d) user representations of the model with ``state`` loaded, and the prompt style used.

    Built exactly as the trainer evaluates (same backbone, precision, prompts, max length,
    seed), so these are the vectors that scored the items in metrics.json.
    """
    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.eval.evaluate import user_representations
    from cllm4rec_dist.train.recipe import build_model

    model = build_model(cfg, data, device or ("cuda" if torch.cuda.is_available() else "cpu"), loads_weights=True)
    load_trainable(model, state, "the checkpoint's weights (for the user vectors; --no-user-vectors skips them)")
    docs = sorted(data.read_corpus("eval"), key=lambda d: int(d["user"]))
    if [int(d["user"]) for d in docs] != list(range(data.num_users)):
        raise ShardError(f"{data.url}: the eval corpus does not hold exactly one document per user; "
                         "re-run `cllm4rec preprocess`.")
    style = cfg.prediction_style
    space = TokenSpace(data.vocab_size, data.num_users, data.num_items)
    # The trainer's prompts exactly (order seeded by batch.seed, stored order for LLM-FixOrd), so these
    # vectors scored metrics.json.
    vectors = user_representations(model, docs, space, style, cfg.eval.batch_size, cfg.batch.max_length,
                                   cfg.batch.seed, reorder=cfg.reorder)
    return vectors.cpu(), style


# --------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(entity: str, ids: list[str], tables: dict[str, np.ndarray], first_index: int = 0) -> bytes:
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


class _Writer:
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
            if "/" not in name and self.fs.exists(target):
                self.fs.rm(target)

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.fs, posixpath.join(self.root, name), data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --------------------------------------------------------------------------- the export


def _cllm4rec_tables(ckpt_path: str, data_url: str, ids: dict, state: dict, weights: str):
    """CLLM4Rec's exported tables (entity -> name -> matrix) and where each came from."""
    tables: dict[str, dict[str, np.ndarray]] = {"users": {}, "items": {}}
    origin: dict[str, dict[str, str]] = {"users": {}, "items": {}}
    for (entity, table), param in PARAMS.items():
        if param not in state:
            if table == "head":
                continue
            raise ExportError(f"{ckpt_path}: the {weights} weights have no {param!r}; "
                              f"they hold {', '.join(sorted(state)[:8])}. Not a CLLM4Rec checkpoint?")
        tables[entity][table] = state[param].detach().float().cpu().numpy()
        origin[entity][table] = param
    return tables, origin


def export_checkpoint(source: str, out_dir: str, dim: int | None = None, use_best: bool = True,
                      user_vectors: bool = True, data_dir: str | None = None, device: str | None = None) -> dict:
    """Export a run's (or checkpoint's) embeddings to ``out_dir``; returns the export.json content.

    source:       run folder, checkpoint folder, or a trainer.pt (see ``resolve_checkpoint``).
    dim:          PCA-project every table to this many dimensions (paper: 128); None keeps them.
    use_best:     the best-validation weights when the checkpoint has them, else the last state.
    user_vectors: also export the finetuned model's user representations (loads the backbone).
    data_dir:     the preprocessed dataset, when the one in the checkpoint's config has moved.
    device:       where to run the backbone for ``user_vectors`` (default: CUDA if present).
    """
    if dim is not None and dim < 1:
        raise ExportError(f"dim={dim}: must be a positive number of dimensions (or None for no projection).")
    saved = read_saved_weights(source, use_best)
    folder, ckpt_path, state, weights = saved.folder, saved.path, saved.tensors, saved.weights
    cfg = config_from_dict(saved.snapshot["config"], f"{ckpt_path} (snapshot config)")
    state_record = saved.snapshot["state"]
    if saved.sharded:
        if dim is not None:
            raise ExportError(f"{folder}: a row-sharded checkpoint is exported part by part, and a PCA (--dim) needs "
                              "whole tables; export without --dim.")
        return _export_sharded(source, folder, out_dir, cfg, state_record, state, weights, data_dir)

    data_url = data_dir or cfg.data
    try:
        data = ShardedDataset(data_url)
    except ShardError as e:
        raise ExportError(f"{ckpt_path} was trained on dataset {cfg.data!r}, which cannot be opened ({e}). "
                          "Pass the dataset folder with --data (data_dir=...).") from None
    id_maps = data.read_json("id_maps.json")
    ids = {"users": [str(x) for x in id_maps["users"]], "items": [str(x) for x in id_maps["items"]]}

    rec_style = None
    if cfg.recommender == "allmrec":
        from cllm4rec_dist.train.allmrec import export_tables

        tables, origin = export_tables(cfg, data, state, device)
    else:
        tables, origin = _cllm4rec_tables(ckpt_path, data_url, ids, state, weights)
        if user_vectors:
            vectors, rec_style = rec_user_vectors(cfg, data, state, device)
            tables["users"]["rec"] = vectors.numpy().astype(np.float32)
            origin["users"]["rec"] = f"finetuned model: last-token hidden state of the {rec_style!r} prompt"
    for entity, by_name in tables.items():
        for name, matrix in by_name.items():
            if matrix.shape[0] != len(ids[entity]):
                raise ExportError(f"{ckpt_path}: {entity} table {name} has {matrix.shape[0]} rows but "
                                  f"{data_url}/id_maps.json lists {len(ids[entity])} {entity}: the checkpoint was "
                                  "trained on another dataset. Pass the right one with --data.")
    hidden = min(m.shape[1] for by_name in tables.values() for m in by_name.values())
    if dim is not None and dim > hidden:
        raise ExportError(f"dim={dim} is larger than the embedding size {hidden} (the smallest exported table) of {ckpt_path}; "
                          f"pass --dim <= {hidden} (or none).")
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

    writer = _Writer(out_dir)
    for entity in ("users", "items"):
        writer.write(f"{entity[:-1]}_ids.npy", _npy_bytes(np.asarray(ids[entity], dtype=str)))
        for name, matrix in tables[entity].items():
            writer.write(f"{entity}_{name}.npy", _npy_bytes(np.ascontiguousarray(matrix, dtype=np.float32)))
        writer.write(f"{entity}.parquet", _parquet_bytes(entity, ids[entity], tables[entity]))
    if projection:
        buf = io.BytesIO()
        np.savez(buf, **projection)
        writer.write(PROJECTION_FILE, buf.getvalue())

    has_head = "head" in tables["items"]
    manifest = {
        "format": FORMAT, "version": VERSION,
        "source": {"input": source, "checkpoint": ckpt_path, "global_step": state_record.get("global_step"),
                   "recommender": cfg.recommender, "ablation": cfg.ablation, "data": data_url, "backbone": cfg.backbone or data.manifest["backbone"]["path"]},
        "weights": weights,
        "weights_note": ("best-validation weights" if weights == "best" else
                         "last trained state" + (" (asked for)" if not use_best else
                                                 " (the checkpoint has no best-validation copy yet)")),
        "best": state_record.get("best") or None,
        "num_users": len(ids["users"]), "num_items": len(ids["items"]),
        "hidden_size": hidden, "dim": dim if dim is not None else hidden,
        "tables": {entity: {name: {"dim": int(m.shape[1]), "from": origin[entity][name]} for name, m in by.items()}
                   for entity, by in tables.items()},
        "item_scoring": ("projected" if cfg.recommender == "allmrec" else "head" if has_head else "collab"),
        "rec_style": rec_style,
        "projection": None if dim is None else {
            "method": "pca", "file": PROJECTION_FILE, "dim": dim,
            "formula": "projected = (original - <table>_mean) @ <table>_components",
            "explained_variance_ratio": variance_kept},
        "layout": {"ids": "user_ids.npy / item_ids.npy: row k of every users_*/items_* array",
                   "parquet": "users.parquet (user_id, user_index, tables...), items.parquet (item_id, item_index, ...)"},
        "files": writer.files,
    }
    atomic_write(writer.fs, posixpath.join(writer.root, EXPORT_FILE),
                 json.dumps(manifest, indent=1, sort_keys=False, default=str).encode("utf-8"))
    return manifest


def _export_sharded(source: str, folder: str, out_dir: str, cfg: TrainConfig, state_record: dict,
                    replicated: dict, weights: str, data_dir: str | None) -> dict:
    """The per-part export of a row-sharded checkpoint (module docstring): one Parquet file per saved row range."""
    if "://" in folder and not folder.startswith("file://"):
        raise ExportError(f"{folder}: sharded checkpoints are exported from a local folder; copy it here first.")
    data = ShardedDataset(data_dir or cfg.data)
    id_maps = data.read_json("id_maps.json")
    ids = {"users": [str(x) for x in id_maps["users"]], "items": [str(x) for x in id_maps["items"]]}
    sharded = posixpath.join(folder, SHARDED_DIR)
    prefix = BEST if weights == "best" else TRAINABLE
    saved = sharded_keys(sharded)
    writer = _Writer(out_dir)
    parts: dict[str, list[dict]] = {"users": [], "items": []}
    origin: dict[str, dict[str, str]] = {"users": {}, "items": {}}
    hidden = None
    for entity in ("users", "items"):
        params, readers = {}, {}
        for (e, table), param in PARAMS.items():
            if e != entity:
                continue
            if param in replicated:  # a replicated table beside sharded ones: sliced per part
                readers[table] = None
            elif f"{prefix}.{param}" in saved:
                readers[table] = sharded_parts(sharded, f"{prefix}.{param}")
            elif table == "head":  # a tied backbone has no separate head
                continue
            else:
                raise ExportError(f"{folder}: the {weights} weights have no {param!r}. Not a CLLM4Rec checkpoint?")
            params[table] = origin[entity][table] = param
        lead = next(t for t, r in readers.items() if r is not None)
        for number, (first, rows) in enumerate(readers[lead]):
            columns = {lead: rows.float().numpy()}
            for table, reader in readers.items():
                if table == lead:
                    continue
                if reader is None:
                    columns[table] = replicated[params[table]][first:first + rows.shape[0]].float().numpy()
                    continue
                other_first, other = next(reader)
                if other_first != first or other.shape[0] != rows.shape[0]:
                    raise ExportError(f"{folder}: {params[table]} was saved in other row ranges than {params[lead]}; "
                                      "export it from a checkpoint written with one sharding.")
                columns[table] = other.float().numpy()
            hidden = rows.shape[1]
            name = f"{entity}-part-{number:05d}.parquet"
            part_ids = ids[entity][first:first + rows.shape[0]]
            if len(part_ids) != rows.shape[0]:
                raise ExportError(f"{folder}: {entity} rows {first}..{first + rows.shape[0] - 1} but "
                                  f"{data.url}/id_maps.json lists {len(ids[entity])} {entity}: another dataset? "
                                  "Pass the right one with --data.")
            writer.write(name, _parquet_bytes(entity, part_ids, columns, first))
            parts[entity].append({"file": name, "first_index": first, "rows": int(rows.shape[0])})
    manifest = {
        "format": FORMAT, "version": VERSION,
        "source": {"input": source, "checkpoint": posixpath.join(folder, TRAINER_FILE),
                   "global_step": state_record.get("global_step"), "recommender": cfg.recommender,
                   "ablation": cfg.ablation, "data": data.url},
        "weights": weights, "best": state_record.get("best") or None,
        "num_users": len(ids["users"]), "num_items": len(ids["items"]), "hidden_size": hidden, "dim": hidden,
        "tables": {entity: {name: {"dim": hidden, "from": param} for name, param in by.items()}
                   for entity, by in origin.items()},
        "item_scoring": "head" if "head" in origin["items"] else "collab",
        "rec_style": None, "projection": None,
        "user_vectors": "not exported: the checkpoint's tables are row-sharded (each needs a whole forward pass)",
        "layout": {"sharded": True, "parts": parts,
                   "parquet": "<entity>-part-NNNNN.parquet: the rows first_index.. of every table of the entity, "
                              "with the original ids"},
        "files": writer.files,
    }
    atomic_write(writer.fs, posixpath.join(writer.root, EXPORT_FILE),
                 json.dumps(manifest, indent=1, sort_keys=False, default=str).encode("utf-8"))
    return manifest


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


__all__ = ["ExportError", "export_checkpoint", "fit_pca", "project", "read_export", "resolve_checkpoint"]
