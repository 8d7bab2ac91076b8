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
    """Fail when the dataset (``cfg.data``, opened) has no leave-one-out data, or the adapter names target modules the
    LLM does not have."""
    SequentialData.open(data)
    if cfg.model.uses_adapter:
        from cllm4rec_dist.model.adapter import check_adapter_targets

        location = run_backbone(cfg.backbone, data.manifest)
        check_adapter_targets(cfg.model.backbone_settings(), location["path"], location["gguf_file"])
