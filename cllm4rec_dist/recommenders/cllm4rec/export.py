"""CLLM4Rec's export hook: its token tables, item head and finetuned user vectors, with original ids.

The learned token embeddings are what downstream systems consume (the paper's CLLM4Rec-Emb feeds them, projected to
128 dimensions, to a two-tower retrieval model). Tables: ``collab`` / ``content`` (Z^l, Z^c) for users and items,
``head`` (items, untied backbones only: the item scoring vectors) and ``rec`` (users, optional: the finetuned
model's user representation, needs the backbone). export/embeddings.py writes them.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

import numpy as np
import torch

from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
from cllm4rec_dist.export.embeddings import (
    FORMAT,
    VERSION,
    ExportedTables,
    ExportError,
    ExportWriter,
    parquet_bytes,
    write_manifest,
)
from cllm4rec_dist.recommenders.cllm4rec.builder import build_model
from cllm4rec_dist.train.checkpoint import (
    BEST,
    SHARDED_DIR,
    TRAINABLE,
    TRAINER_FILE,
    SavedWeights,
    load_trainable,
    sharded_keys,
    sharded_parts,
)

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig

# (entity, table) -> parameter name in the checkpoint's trainable state
PARAMS = {
    ("users", "collab"): "collab_user_table.weight",
    ("users", "content"): "content_user_table.weight",
    ("items", "collab"): "collab_item_table.weight",
    ("items", "content"): "content_item_table.weight",
    ("items", "head"): "item_head.weight",
}

def rec_user_vectors(cfg: TrainConfig, data: ShardedDataset, state: dict[str, torch.Tensor],
                     device: str | None = None) -> tuple[torch.Tensor, str]:
    """(I, d) user representations of the model with ``state`` loaded, and the prompt style used.

    Built exactly as the trainer evaluates (same backbone, precision, prompts, max length,
    seed), so these are the vectors that scored the items in metrics.json.
    """
    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.recommenders.cllm4rec.evaluate import user_representations
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



def _token_tables(ckpt_path: str, state: dict, weights: str):
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


def export_tables(cfg: TrainConfig, data: ShardedDataset, saved: SavedWeights, device: str | None,
                  user_vectors: bool) -> ExportedTables:
    """The collaborative and content tables, the separate item head when there is one, and (``user_vectors``) the
    finetuned model's user representations: the hidden state of the last prompt token over the user's TRAIN items,
    which needs the backbone. For tied backbones (GPT-2) the item scoring vectors ARE ``collab``."""
    tables, origin = _token_tables(saved.path, saved.tensors, saved.weights)
    rec_style = None
    if user_vectors:
        vectors, rec_style = rec_user_vectors(cfg, data, saved.tensors, device)
        tables["users"]["rec"] = vectors.numpy().astype(np.float32)
        origin["users"]["rec"] = f"finetuned model: last-token hidden state of the {rec_style!r} prompt"
    scoring = "head" if "head" in tables["items"] else "collab"
    return ExportedTables(tables, origin, scoring, {"rec_style": rec_style})


def export_sharded(source: str, saved_weights: SavedWeights, out_dir: str, cfg: TrainConfig,
                   data_dir: str | None) -> dict:
    """The per-part export of a row-sharded checkpoint: one ``users-part-NNNNN.parquet`` / ``items-part-NNNNN.parquet``
    per row range a rank saved (same columns as ``users.parquet``, original ids included), each read from the
    checkpoint's sharded part alone, so no process ever holds a whole table. No NumPy arrays, no PCA and no user
    vectors: each needs whole tables; export.json lists the parts (``read_export`` concatenates them)."""
    folder, state_record = saved_weights.folder, saved_weights.snapshot["state"]
    replicated, weights = saved_weights.tensors, saved_weights.weights
    if "://" in folder and not folder.startswith("file://"):
        raise ExportError(f"{folder}: sharded checkpoints are exported from a local folder; copy it here first.")
    data = ShardedDataset(data_dir or cfg.data)
    id_maps = data.read_json("id_maps.json")
    ids = {"users": [str(x) for x in id_maps["users"]], "items": [str(x) for x in id_maps["items"]]}
    sharded = posixpath.join(folder, SHARDED_DIR)
    prefix = BEST if weights == "best" else TRAINABLE
    saved = sharded_keys(sharded)
    writer = ExportWriter(out_dir)
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
            writer.write(name, parquet_bytes(entity, part_ids, columns, first))
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
    write_manifest(writer, manifest)
    return manifest
