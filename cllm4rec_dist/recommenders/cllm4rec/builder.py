"""The CLLM4Rec model a training config describes, for a preprocessed dataset (recipe, evaluate and export alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cllm4rec_dist.corpus.presets import load_tokenizer
from cllm4rec_dist.corpus.sequences import ITEMS_FILE
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.recommenders.cllm4rec.checks import backbone_location, check_item_texts
from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig


def item_text_ids(data: ShardedDataset, location: dict) -> list[list[int]]:
    """Per item, the backbone-tokenizer ids of its text (items.json's description: title and attributes), for
    ``model.token_init: text``, ``model.content_init: text`` and ``model.cold_item_source: text_hidden``."""
    check_item_texts(data)
    tokenizer = load_tokenizer(location)
    return [tokenizer.encode(" " + text, add_special_tokens=False) if text else []
            for text in data.read_json(ITEMS_FILE)["descriptions"]]


def build_model(cfg: TrainConfig, data: ShardedDataset, device: str, loads_weights: bool = False) -> CLLM4Rec:
    """The CLLM4Rec model a config describes, for a preprocessed dataset (trainer, evaluate and export alike).
    ``loads_weights``: every trainable tensor is replaced from a checkpoint right after (export, evaluate), so the
    tables start the cheap way instead of reading and tokenising the catalogue's texts for nothing."""
    location = backbone_location(cfg, data.manifest)
    texts = item_text_ids(data, location) if cfg.model.reads_item_texts(loads_weights) else None
    return CLLM4Rec(cfg.model.model_config(
        backbone=location["path"], gguf_file=location["gguf_file"], num_users=data.num_users,
        num_items=data.num_items, ablation=cfg.ablation, device=device, item_text_ids=texts,
        loads_weights=loads_weights))
