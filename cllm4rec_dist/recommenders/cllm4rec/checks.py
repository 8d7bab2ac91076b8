"""CLLM4Rec's checks of a dataset against the settings, run on the driver before any worker starts.

Kept apart from the model's code: the launcher's driver runs them while its local Ray cluster starts, and importing
transformers for them (the recipe's module does) held the training workers' start back by seconds. transformers is
read here only when a check needs it: a backbone other than the dataset's, or adapter targets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cllm4rec_dist.corpus.preprocess import tokenizer_identity
from cllm4rec_dist.corpus.presets import load_tokenizer, run_backbone
from cllm4rec_dist.corpus.sequences import ITEMS_FILE
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.settings import ConfigError

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig


def backbone_location(cfg: TrainConfig, manifest: dict) -> dict:
    """The backbone to train with (``run_backbone``): cfg.backbone, else the one the dataset was tokenised with. The
    dataset's token ids are that tokenizer's, so another backbone must have the same one."""
    recorded = manifest["backbone"]
    location = run_backbone(cfg.backbone, manifest)
    if cfg.backbone is None:
        return location
    if tokenizer_identity(load_tokenizer(location)) != recorded["tokenizer_sha256"]:
        raise ConfigError(f"backbone {cfg.backbone}: its tokenizer differs from the one {cfg.data} was tokenised "
                         f"with ({recorded['path']}); re-run `cllm4rec preprocess --backbone {cfg.backbone}`.")
    return location


def check_item_texts(data: ShardedDataset) -> None:
    if ITEMS_FILE not in data.manifest["files"]:
        raise ValueError(f"model.token_init/content_init text or model.cold_item_source text_hidden: {data.url} has "
                         f"no {ITEMS_FILE} (item texts); re-run `cllm4rec preprocess` with this version, or choose "
                         "another token_init / content_init / cold_item_source")


def check_data(cfg: TrainConfig, data: ShardedDataset) -> None:
    """Fail when the settings read item texts the dataset (``cfg.data``, opened) lacks, name a backbone that cannot be
    found or has another tokenizer than the dataset's, or name adapter target modules the backbone does not have."""
    if cfg.model.reads_item_texts():
        check_item_texts(data)
    if cfg.backbone is not None or cfg.model.uses_adapter:
        location = backbone_location(cfg, data.manifest)
        if cfg.model.uses_adapter:
            from cllm4rec_dist.model.adapter import check_adapter_targets

            check_adapter_targets(cfg.model, location["path"], location["gguf_file"])
