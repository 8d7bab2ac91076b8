"""A-LLMRec's export hook: the stage-0 CF, stage-1 joint and stage-2 projected embeddings (cllm4rec export)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.export.embeddings import ExportedTables
from cllm4rec_dist.model.cf import pad_histories
from cllm4rec_dist.recommenders.allmrec.recipe import build_model
from cllm4rec_dist.train.checkpoint import SavedWeights, load_trainable

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig


def export_tables(cfg: TrainConfig, shards: ShardedDataset, saved: SavedWeights, device: str | None,
                  user_vectors: bool) -> ExportedTables:
    """A-LLMRec's exported tables (entity -> name -> [rows, dim] float32) and what each is; items are scored with
    ``projected`` (``user_vectors``: every user table needs only the small stage-0 model, always exported).

    items: ``cf`` (E_i of the stage-0 model), ``joint`` (e_i: the text path for cold items),
    ``projected`` (F_I(e_i), the item soft token); users: ``cf`` (x_u over every known item, train
    and valid), ``projected`` (F_U(x_u), the user soft token). Rows follow id_maps.json.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = SequentialData.open(shards)
    model, _ = build_model(cfg, data, shards.manifest, device)
    load_trainable(model, saved.tensors)
    model.eval()
    cold = torch.tensor([c == 0 for c in data.train_counts], dtype=torch.bool)
    with torch.no_grad():
        items = model.cf.item_embeddings()
        joint = model.align.joint_embeddings(items, model.text.all(), cold)
        histories = pad_histories([data.prefix(u, "test") for u in range(data.num_users)], cfg.allmrec.cf_max_len)
        users = torch.cat([model.cf.user_representation(histories[k:k + 1024].to(device))
                           for k in range(0, data.num_users, 1024)])
        tables = {"users": {"cf": users, "projected": model.llm.user_projection(users)},
                  "items": {"cf": items, "joint": joint, "projected": model.llm.item_projection(joint)}}
    origin = {"users": {"cf": f"stage 0 {cfg.allmrec.cf_model}: x_u over the train + valid items",
                        "projected": "stage 2 F_U(x_u): the user soft token"},
              "items": {"cf": f"stage 0 {cfg.allmrec.cf_model}: item embeddings E_i",
                        "joint": "stage 1 e_i = f_enc^I(E_i), f_enc^T(SBERT text) for items with no train interaction",
                        "projected": "stage 2 F_I(e_i): the item soft token"}}
    tables = {e: {n: m.detach().float().cpu().numpy() for n, m in by.items()} for e, by in tables.items()}
    return ExportedTables(tables, origin, "projected", {"rec_style": None})
