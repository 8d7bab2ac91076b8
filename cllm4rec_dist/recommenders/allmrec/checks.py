"""A-LLMRec's checks of a dataset against the settings, run on the driver before any worker starts (apart from the
model's code, which imports transformers: see cllm4rec/checks.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cllm4rec_dist.corpus.presets import run_backbone
from cllm4rec_dist.corpus.sequences import SequentialData

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig
    from cllm4rec_dist.corpus.shards import ShardedDataset


def check_data(cfg: TrainConfig, data: ShardedDataset) -> None:
    """Fail when the dataset (``cfg.data``, opened) has no leave-one-out data, the adapter names target modules the
    LLM does not have, or the chat template does not render a user turn with the backbone's tokenizer."""
    SequentialData.open(data)
    location = run_backbone(cfg.backbone, data.manifest)
    if cfg.model.uses_adapter:
        from cllm4rec_dist.model.adapter import check_adapter_targets

        check_adapter_targets(cfg.model.backbone_settings(), location["path"], location["gguf_file"])
    if cfg.allmrec.chat_template is not None:
        from cllm4rec_dist.corpus.presets import load_tokenizer
        from cllm4rec_dist.recommenders.allmrec.prompts import chat_template_source

        chat_template_source(cfg.allmrec.chat_template, load_tokenizer(location))
